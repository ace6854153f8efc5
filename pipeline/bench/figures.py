"""The figures of one configuration, from the generations it made (warm-up excluded)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from pipeline.bench.records import Generation
from pipeline.critical_path import TARGET_BUCKETS, TargetTimeSplit

PROCESSES = ("target", "draft")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile q in [0, 100] (numpy's default method)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


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


@dataclass
class Figures:
    name: str
    mode: str
    k: int | None
    system: str  # "specpipe" or "transformers"
    sequences: int
    tokens: int
    wall_s: float
    tokens_per_s: float  # generated tokens / wall time, prefill included
    decode_tokens_per_s: float  # after the first token: (tokens - 1 per sequence) / (wall - TTFT)
    ttft_s: float  # mean
    itl_ms: dict[str, float]  # p50, p90, p99 of inter-token latency
    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    acceptance_rate: float | None = None  # accepted / drafted
    mean_acceptance_length: float | None = None  # (accepted + one bonus per verification) / verifications
    per_position_acceptance: list[float | None] = field(default_factory=list)
    accepted_length_histogram: list[int] = field(default_factory=list)
    predraft_hit_rate: float | None = None  # overlap: verifications whose next window was ready
    mean_branches: float | None = None  # overlap: outcomes drafted ahead per verification
    time_split_s: dict[str, dict[str, float]] = field(default_factory=dict)  # process -> part -> seconds
    # the target's wall by what it did or waited for (pipeline.critical_path): bucket -> share
    target_wall_shares: dict[str, float] = field(default_factory=dict)
    warmup: dict[str, float] = field(default_factory=dict)  # the uncounted runs: sequences, tokens, wall_s
    speedup_vs_target_only: float | None = None
    speedup_vs_hf_target_only: float | None = None
    predicted_speedup: float | None = None
    measured_over_predicted: float | None = None
    theory: dict[str, float] = field(default_factory=dict)  # the step costs and rates the prediction used


def figures(name: str, mode: str, k: int | None, system: str, runs: list[Generation],
            warmup: list[Generation]) -> Figures:
    tokens = sum(len(g.token_ids) for g in runs)
    wall = sum(g.wall_s for g in runs)
    decode_tokens = sum(len(g.token_ids) - 1 for g in runs)
    decode_wall = sum(g.wall_s - g.ttft_s for g in runs)
    latencies = [gap for g in runs for gap in inter_token_latencies(g)]
    result = Figures(
        name, mode, k, system, len(runs), tokens, wall, tokens / wall,
        decode_tokens / decode_wall if decode_wall > 0 else float("nan"),
        statistics.fmean(g.ttft_s for g in runs),
        {f"p{q}": percentile(latencies, q) * 1e3 for q in (50, 90, 99)},
        warmup={"sequences": len(warmup), "tokens": sum(len(g.token_ids) for g in warmup),
                "wall_s": sum(g.wall_s for g in warmup)},
    )
    if system != "specpipe":
        return result
    result.drafted = sum(g.drafted for g in runs)
    result.accepted = sum(g.accepted for g in runs)
    result.verifications = sum(g.verifications for g in runs)
    if result.drafted:
        result.acceptance_rate = result.accepted / result.drafted
        result.mean_acceptance_length = (result.accepted + result.verifications) / result.verifications
        lengths = [n for g in runs for n in g.accepted_lengths]
        windows = [w for g in runs for w in g.window_sizes]
        result.per_position_acceptance = per_position_acceptance(lengths, windows)
        result.accepted_length_histogram = histogram(lengths, max(windows))
    hits, misses = sum(g.predraft_hits for g in runs), sum(g.predraft_misses for g in runs)
    if hits + misses:
        result.predraft_hit_rate = hits / (hits + misses)
    branches = [n for g in runs for n in g.speculated_branches]
    if branches:
        result.mean_branches = statistics.fmean(branches)
    split: dict[str, dict[str, float]] = {}
    for process in PROCESSES:
        busy = sum(g.busy_s.get(process, 0.0) for g in runs)
        ipc = sum(g.ipc_s.get(process, 0.0) for g in runs)
        if busy or process == "target":
            split[process] = {"busy": busy, "ipc": ipc, "idle": max(0.0, wall - busy - ipc)}
    coordinator = sum(g.coordinator_s for g in runs)
    split["coordinator"] = {"busy": coordinator, "idle": max(0.0, wall - coordinator)}
    result.time_split_s = split
    result.target_wall_shares = target_wall_shares([g.target_split for g in runs if g.target_split is not None])
    return result


def target_wall_shares(splits: list[TargetTimeSplit]) -> dict[str, float]:
    """Each bucket's share of all the runs' traced wall, with "coordination" (coordinator and IPC)."""
    wall = sum(s.wall_s for s in splits)
    if not splits or wall <= 0:
        return {}
    shares = {bucket: sum(getattr(s, f"{bucket}_s") for s in splits) / wall for bucket in TARGET_BUCKETS}
    shares["coordination"] = sum(s.coordination_s for s in splits) / wall
    return shares
