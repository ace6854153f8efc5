"""The figures of one configuration at one concurrency, from the rounds it ran (warm-up excluded).

Rates are aggregate: every token generated in the measured rounds over the sum of the rounds' walls (a
round is c prompts decoded at once, from the call to the last sequence's end), so at concurrency 1 they
are per-prompt rates and at c > 1 the system's throughput under a closed-loop load of c requests.
Latencies (TTFT, inter-token) are per request, each sequence's times taken from its own start.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from pipeline.bench.records import Generation, Round
from pipeline.runtime.critical_path import TARGET_BUCKETS, TargetTimeSplit

PROCESSES = ("target", "draft")
QUANTILES = (50, 90, 99)
# of a goodput controller's summary, the figures that are means: combined across rounds weighted by plans
MEAN_KEYS = ("mean_k", "zero_k_share")
TIME_WEIGHTED_KEYS = ("predicted_speedup",)  # combined across rounds weighted by the rounds' walls


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile q in [0, 100] (numpy's default method)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def percentiles_ms(values: list[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) * 1e3 for q in QUANTILES}


def inter_token_latencies(generation: Generation) -> list[float]:
    """Seconds between consecutive tokens after the first. Tokens committed together (one verification)
    are 0 apart: a user sees them at once, and the wait before the group carries the whole step."""
    times = generation.token_times
    return [later - earlier for earlier, later in zip(times, times[1:])]


def per_position_acceptance(accepted_lengths: list[int], window_sizes: list[int]) -> list[float | None]:
    """P(drafted token i accepted | tokens 0..i-1 accepted and the window reached i), i = 0..k-1."""
    k = max(window_sizes, default=0)
    rates: list[float | None] = []
    for i in range(k):
        reached = [a for a, w in zip(accepted_lengths, window_sizes) if a >= i and w > i]
        rates.append(sum(a > i for a in reached) / len(reached) if reached else None)
    return rates


def histogram(accepted_lengths: list[int], k: int) -> list[int]:
    """counts[n] = verifications that accepted n drafted tokens, n = 0..k."""
    counts = [0] * (k + 1)
    for n in accepted_lengths:
        counts[n] += 1
    return counts


def combined_speculation(rounds: list[Round]) -> dict:
    """The goodput controller's summaries of several rounds as one: counts and seconds added up (the
    "reasons" too, reason by reason), means weighted by each round's plans, the predicted speedup by each
    round's wall. {} when no round has one."""
    summaries = [(r.speculation, r.wall_s) for r in rounds if r.speculation]
    if not summaries:
        return {}
    out: dict = {}
    keys = list(dict.fromkeys(key for summary, _ in summaries for key in summary))
    for key in keys:
        present = [(s[key], s.get("plans") or 0, wall) for s, wall in summaries if s.get(key) is not None]
        if not present:
            out[key] = None
        elif key in MEAN_KEYS or key in TIME_WEIGHTED_KEYS:
            weighted = [(value, wall if key in TIME_WEIGHTED_KEYS else plans) for value, plans, wall in present]
            total = sum(weight for _, weight in weighted)
            out[key] = (sum(value * weight for value, weight in weighted) / total if total > 0
                        else statistics.fmean(value for value, _ in weighted))
        elif all(isinstance(value, dict) for value, _, _ in present):
            counts: dict = {}
            for value, _, _ in present:
                for reason, count in value.items():
                    counts[reason] = counts.get(reason, 0) + count
            out[key] = counts
        elif all(isinstance(value, (int, float)) and not isinstance(value, bool) for value, _, _ in present):
            out[key] = sum(value for value, _, _ in present)
        else:
            out[key] = present[-1][0]  # neither a count nor a mean: the last round's
    return out


@dataclass
class Figures:
    name: str  # the configuration, without the concurrency (that is its own field)
    concurrency: int  # prompts decoded at once
    mode: str
    k: int | None
    system: str  # "specpipe", "transformers" or "llama.cpp"
    sequences: int
    tokens: int
    wall_s: float  # the measured rounds' walls, added up
    tokens_per_s: float  # aggregate: generated tokens / wall_s, prefill included
    # after the first token: (tokens - 1 per sequence) / (each round's wall after its first token), added up
    decode_tokens_per_s: float
    ttft_s: float  # mean over the requests
    itl_ms: dict[str, float]  # p50, p90, p99 of inter-token latency, over every request's tokens
    ttft_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p99 of the requests' TTFT
    k_policy: str = "fixed"  # how the window size was chosen: fixed, adaptive or goodput
    rounds: int = 0  # measured rounds (calls of up to `concurrency` prompts)
    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    plain_steps: int = 0  # target steps after the prefill with no drafted token
    acceptance_rate: float | None = None  # accepted / drafted
    mean_acceptance_length: float | None = None  # (accepted + one bonus per verification) / verifications
    mean_drafted_length: float | None = None  # drafted tokens per target step per sequence (after the prefill)
    per_position_acceptance: list[float | None] = field(default_factory=list)
    accepted_length_histogram: list[int] = field(default_factory=list)
    predraft_hit_rate: float | None = None  # overlap: verifications whose next window was ready
    mean_branches: float | None = None  # overlap: outcomes drafted ahead per verification
    time_split_s: dict[str, dict[str, float]] = field(default_factory=dict)  # process -> part -> seconds
    # the target's wall by what it did or waited for (pipeline.runtime.critical_path): bucket -> share
    target_wall_shares: dict[str, float] = field(default_factory=dict)
    speculation: dict = field(default_factory=dict)  # the goodput controller's summaries, combined (see above)
    warmup: dict[str, float] = field(default_factory=dict)  # the uncounted runs: rounds, sequences, tokens, wall_s
    speedup_vs_target_only: float | None = None  # against target-only at the same concurrency
    speedup_vs_hf_target_only: float | None = None  # against hf target-only at the same concurrency
    speedup_vs_llama_cpp_target_only: float | None = None  # against llama.cpp target-only at the same concurrency
    predicted_speedup: float | None = None
    measured_over_predicted: float | None = None
    theory: dict[str, float] = field(default_factory=dict)  # the step costs and rates the prediction used


def figures(name: str, mode: str, k: int | None, system: str, rounds: list[Round], warmup: list[Round],
            concurrency: int = 1, k_policy: str = "fixed") -> Figures:
    runs = [g for r in rounds for g in r.generations]
    tokens = sum(len(g.token_ids) for g in runs)
    wall = sum(r.wall_s for r in rounds)
    decode_tokens = sum(len(g.token_ids) - 1 for g in runs)
    decode_wall = sum(r.wall_s - min(g.ttft_s for g in r.generations) for r in rounds if r.generations)
    latencies = [gap for g in runs for gap in inter_token_latencies(g)]
    ttfts = [g.ttft_s for g in runs]
    warm = [g for r in warmup for g in r.generations]
    result = Figures(
        name, concurrency, mode, k, system, len(runs), tokens, wall, tokens / wall if wall > 0 else float("nan"),
        decode_tokens / decode_wall if decode_wall > 0 else float("nan"),
        statistics.fmean(ttfts) if ttfts else float("nan"), percentiles_ms(latencies),
        ttft_ms=percentiles_ms(ttfts), k_policy=k_policy, rounds=len(rounds),
        warmup={"rounds": len(warmup), "sequences": len(warm), "tokens": sum(len(g.token_ids) for g in warm),
                "wall_s": sum(r.wall_s for r in warmup)},
    )
    result.drafted = sum(g.drafted for g in runs)
    result.accepted = sum(g.accepted for g in runs)
    if system != "specpipe":  # a peer says at most what it drafted and accepted (llama.cpp's server does)
        if result.drafted:
            result.acceptance_rate = result.accepted / result.drafted
        return result
    result.verifications = sum(g.verifications for g in runs)
    result.plain_steps = sum(g.plain_steps for g in runs)
    if result.verifications + result.plain_steps:
        result.mean_drafted_length = result.drafted / (result.verifications + result.plain_steps)
    if result.drafted:
        result.acceptance_rate = result.accepted / result.drafted
        result.mean_acceptance_length = (result.accepted + result.verifications) / result.verifications
        lengths = [n for g in runs for n in g.accepted_lengths]
        windows = [w for g in runs for w in g.window_sizes]
        result.per_position_acceptance = per_position_acceptance(lengths, windows)
        result.accepted_length_histogram = histogram(lengths, max(windows)) if windows else []
    hits, misses = sum(g.predraft_hits for g in runs), sum(g.predraft_misses for g in runs)
    if hits + misses:
        result.predraft_hit_rate = hits / (hits + misses)
    branches = [n for g in runs for n in g.speculated_branches]
    if branches:
        result.mean_branches = statistics.fmean(branches)
    split: dict[str, dict[str, float]] = {}
    for process in PROCESSES:
        busy = sum(r.busy_s.get(process, 0.0) for r in rounds)
        ipc = sum(r.ipc_s.get(process, 0.0) for r in rounds)
        if busy or process == "target":
            # busy and ipc come from two processes' clocks and can overrun the coordinator's wall by a
            # hair on a loaded machine: clipped, so that the three parts always add up to the wall
            busy = min(busy, wall)
            ipc = min(ipc, wall - busy)
            split[process] = {"busy": busy, "ipc": ipc, "idle": wall - busy - ipc}
    coordinator = min(sum(r.coordinator_s for r in rounds), wall)
    split["coordinator"] = {"busy": coordinator, "idle": wall - coordinator}
    result.time_split_s = split
    result.target_wall_shares = target_wall_shares([r.target_split for r in rounds if r.target_split is not None])
    result.speculation = combined_speculation(rounds)
    return result


def target_wall_shares(splits: list[TargetTimeSplit]) -> dict[str, float]:
    """Each bucket's share of all the runs' traced wall, with "coordination" (coordinator and IPC)."""
    wall = sum(s.wall_s for s in splits)
    if not splits or wall <= 0:
        return {}
    shares = {bucket: sum(getattr(s, f"{bucket}_s") for s in splits) / wall for bucket in TARGET_BUCKETS}
    shares["coordination"] = sum(s.coordination_s for s in splits) / wall
    return shares
