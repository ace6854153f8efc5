"""`specpipe profile`: one prompt set through the pipeline with every process recording its spans.

The trace shows each process on its own track (the coordinator's loop and its requests in flight,
each worker's receive, unpack, compute, pack, send and idle time) on one clock, so that the
overlap of drafting with verification can be seen. The summary says where the wall time went and
compares the measured time per token with what the measured step costs predict.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.algorithm.generation import generate
from pipeline.algorithm.scheduler import Sequence
from pipeline.config import (
    MEASURED_PROMPTS,
    WARMUP_PROMPTS,
    DecodeConfig,
    ModelsConfig,
    PromptsConfig,
    WorkersConfig,
)
from pipeline.prompts import encode_prompt, select_prompts
from pipeline.runtime.cluster import LocalCluster, cluster_config
from pipeline.runtime.critical_path import TargetTimeSplit, split_lines, split_target_time
from pipeline.runtime.preflight import check_checkpoints, check_settings, check_workers
from pipeline.runtime.tracing import (
    ProcessSpans,
    chrome_trace,
    collect_spans,
    measure_offset,
    start_tracing,
    write_trace,
)
from workers.bundled import HELDOUT_PROMPTS
from workers.model.checkpoint import load_tokenizer
from workers.protocol.limits import MAX_TRACE_SPANS
from workers.protocol.messages import Span
from workers.spans import SpanRecorder

VERIFICATION = ("decode", "verify", "chained")  # the target's steps during which a draft can work ahead


@dataclass(frozen=True)
class ProfileConfig:
    """What `specpipe profile` runs: the concerns it shares with launch and bench, and its trace's options."""

    models: ModelsConfig = ModelsConfig()
    workers: WorkersConfig = WorkersConfig()  # profile's own workers run on the CPU
    prompts: PromptsConfig = PromptsConfig(count=MEASURED_PROMPTS, warmup=WARMUP_PROMPTS)  # default: held-out
    decode: DecodeConfig = DecodeConfig()
    concurrency: int = 1
    trace_path: Path = Path("specpipe-trace.json")
    max_spans: int = MAX_TRACE_SPANS  # spans kept per process

    def validate(self) -> None:
        self.prompts.validate()
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if not 1 <= self.max_spans <= MAX_TRACE_SPANS:
            raise ValueError(f"--max-spans {self.max_spans} must be between 1 and {MAX_TRACE_SPANS}")


@dataclass
class Profile:
    processes: list[ProcessSpans]
    sequences: list[Sequence]
    origin_s: float  # coordinator clock when the traced generation began
    wall_s: float
    warmup_s: float | None
    mode: str
    k: int
    speculation: dict | None = None  # the goodput controller's summary (--k-policy goodput)
    speculation_events: list[str] = field(default_factory=list)  # when it switched speculation off and on


def run_profile_command(config: ProfileConfig) -> None:
    """Checks what was asked, profiles, prints the summary; bad input raises ValueError naming the option."""
    config.validate()
    check_workers(config.workers)
    context = check_checkpoints(config.models, config.decode.uses_draft)
    check_settings(config.decode, context, config.concurrency)
    for line in summary_lines(run_profile(config), config.trace_path):
        print(line)


def run_profile(config: ProfileConfig) -> Profile:
    config.validate()
    tokenizer = load_tokenizer(config.models.target_dir)
    texts = select_prompts(config.prompts, HELDOUT_PROMPTS)
    warm, prompts = ([encode_prompt(tokenizer, text) for text in selected]
                     for selected in (texts.warmup, texts.measured))
    decode = config.decode
    events: list[str] = []  # the goodput controller's switches, as they happened
    slots = decode.slots(config.concurrency)
    with LocalCluster(cluster_config(config.models, config.workers, decode.mode, slots)) as cluster:
        transport, limits = cluster.transport, cluster.limits()
        roles = list(cluster.ready)
        warmup_s = None
        if warm:  # untraced: first calls allocate and fill caches
            began = time.perf_counter()
            generate(transport, warm, decode, limits, config.concurrency)
            warmup_s = time.perf_counter() - began
        clocks = {role: measure_offset(transport, role) for role in roles}
        recorder = SpanRecorder()
        transport.spans = recorder
        start_tracing(transport, roles, config.max_spans)
        recorder.start(config.max_spans)
        origin = time.perf_counter()
        sequences, engine = generate(transport, prompts, decode, limits, config.concurrency, spans=recorder,
                                     on_event=events.append)
        wall = time.perf_counter() - origin
        coordinator_spans, coordinator_dropped = recorder.collect()
        processes = [ProcessSpans("coord", os.getpid(), coordinator_spans, dropped=coordinator_dropped)]
        for role in ("draft", "target"):
            if role in roles:
                spans, dropped = collect_spans(transport, role)
                processes.append(ProcessSpans(role, cluster.ready[role].pid, spans, clocks[role], dropped))
    profile = Profile(processes, sequences, origin, wall, warmup_s, decode.mode, decode.k,
                      engine.scheduler.controller_summary(), events)
    write_trace(config.trace_path, chrome_trace(processes, origin, {
        "mode": profile.mode, "k": profile.k, "prompts": len(prompts), "wall_s": wall,
        "tokens": sum(len(s.generated) for s in sequences)}))
    return profile


# --- the summary -----------------------------------------------------------------------------------


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def overlap_length(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Time covered by both interval sets (each set's intervals may not overlap among themselves)."""
    return union_length(a) + union_length(b) - union_length(a + b)


def intervals(spans: list[Span], names: tuple[str, ...]) -> list[tuple[float, float]]:
    return [(s.start_s, s.start_s + s.duration_s) for s in spans if s.name in names]


def self_times(spans: list[Span]) -> list[float]:
    """Each span's duration less that of the spans nested in it (one lane: spans nest or follow)."""
    order = sorted(range(len(spans)), key=lambda i: (spans[i].start_s, -spans[i].duration_s))
    own = [span.duration_s for span in spans]
    open_spans: list[int] = []  # indices of the spans enclosing the current one, innermost last
    for i in order:
        start = spans[i].start_s
        while open_spans and spans[open_spans[-1]].start_s + spans[open_spans[-1]].duration_s <= start:
            open_spans.pop()
        if open_spans:
            own[open_spans[-1]] -= spans[i].duration_s
        open_spans.append(i)
    return own


@dataclass(frozen=True)
class SpanTotal:
    process: str
    name: str
    count: int
    self_s: float  # nested spans taken out: a coordinator's "schedule" holds its "send"s
    median_s: float
    mean_s: float


def span_totals(profile: Profile) -> list[SpanTotal]:
    """Per process and span name, from its main loop (the coordinator's request lanes overlap it)."""
    rows = []
    for process in profile.processes:
        loop = [span for span in process.spans if not span.lane]
        by_name: dict[str, tuple[list[float], list[float]]] = {}
        for span, own in zip(loop, self_times(loop)):
            durations, owns = by_name.setdefault(span.name, ([], []))
            durations.append(span.duration_s)
            owns.append(own)
        for name, (durations, owns) in sorted(by_name.items(), key=lambda item: -sum(item[1][1])):
            rows.append(SpanTotal(process.name, name, len(durations), sum(owns), statistics.median(durations),
                                    statistics.fmean(durations)))
    return rows


def round_trip_means(profile: Profile) -> dict[tuple[str, int], float]:
    """(kind, size) -> mean round trip the coordinator saw, from its request lanes (means, not
    medians: the wall time pays every slow step, and a pipeline's tails are long)."""
    trips: dict[tuple[str, int], list[float]] = {}
    for span in profile.processes[0].spans:
        if span.lane:
            trips.setdefault((span.name, span.size), []).append(span.duration_s)
    return {key: statistics.fmean(values) for key, values in trips.items()}


def predicted_ms_per_token(profile: Profile) -> float | None:
    """Theory from this run's step costs: target-only T_t; serial (T_d + T_v) / E[tau]; overlap
    (max(T_v, T_s) + m * T_d) / E[tau], T_s a speculation's round trip and m the pre-draft miss rate
    (see pipeline.bench.theory)."""
    means = round_trip_means(profile)
    if profile.mode == "target-only":
        decode = means.get(("decode", 0))
        return None if decode is None else decode * 1e3
    draft = means.get(("draft", profile.k))
    coordinator_lanes = [span for span in profile.processes[0].spans if span.lane]
    verify_trips = [span.duration_s for span in coordinator_lanes  # chained: verifications sent ahead
                    if (span.name, span.size) == ("verify", profile.k) or span.name == "chained"]
    verify = statistics.fmean(verify_trips) if verify_trips else None
    stats = [s.stats for s in profile.sequences]
    verifications = sum(s.verifications for s in stats)
    if draft is None or verify is None or not verifications:
        return None
    mean_length = (sum(s.accepted for s in stats) + verifications) / verifications
    if profile.mode == "serial":
        cycle = draft + verify
    else:  # the drafting ahead (one speculation per verification) runs beside the verification
        hits, misses = sum(s.predraft_hits for s in stats), sum(s.predraft_misses for s in stats)
        ahead = [span.duration_s for span in coordinator_lanes if span.name == "speculate"]
        cycle = max(verify, statistics.fmean(ahead) if ahead else draft) + (misses / max(hits + misses, 1)) * draft
    return cycle / mean_length * 1e3


def target_time_split(profile: Profile) -> TargetTimeSplit:
    """The traced window on the target's timeline, bucketed (see pipeline.runtime.critical_path)."""
    aligned = {p.name: p.aligned() for p in profile.processes}
    return split_target_time(aligned["target"], aligned["coord"], aligned.get("draft", []),
                             (profile.origin_s, profile.origin_s + profile.wall_s))


def measured_ms_per_token(profile: Profile) -> float | None:
    """After the first token (prefill apart): decode time over the tokens it made, all sequences."""
    decode_s = tokens = 0
    for sequence in profile.sequences:
        times = sequence.stats.token_times
        if len(times) > 1:
            decode_s += times[-1] - times[0]
            tokens += len(times) - 1
    return decode_s / tokens * 1e3 if tokens else None


def summary_lines(profile: Profile, trace_path: Path) -> list[str]:
    wall = profile.wall_s
    tokens = sum(len(s.generated) for s in profile.sequences)
    lines = [f"[coord] profile: {profile.mode}" + (f" k={profile.k}" if profile.mode != "target-only" else "")
             + f", {len(profile.sequences)} prompt(s), {tokens} tokens in {wall:.3f} s ({tokens / wall:.1f} tokens/s)"
             + (f"; warm-up {profile.warmup_s:.2f} s, not traced" if profile.warmup_s is not None else "")]
    lines.append(f"{'process':<8} {'span':<14} {'count':>6} {'self ms':>10} {'median ms':>10} {'mean ms':>9} "
                 f"{'% of wall':>9}")
    for row in span_totals(profile):
        lines.append(f"{row.process:<8} {row.name:<14} {row.count:>6} {row.self_s * 1e3:>10.1f} "
                     f"{row.median_s * 1e3:>10.3f} {row.mean_s * 1e3:>9.3f} {100 * row.self_s / wall:>8.1f}%")
    aligned = {p.name: p.aligned() for p in profile.processes}
    if "draft" in aligned:
        verifying = intervals(aligned["target"], VERIFICATION)
        both = overlap_length(verifying, intervals(aligned["draft"], ("draft", "speculate")))
        lines.append(f"overlap: the draft computed during {100 * both / max(union_length(verifying), 1e-9):.0f}% "
                     f"of the target's verification time ({both * 1e3:.1f} of {union_length(verifying) * 1e3:.1f} ms)")
    lines += split_lines(target_time_split(profile))
    measured, predicted = measured_ms_per_token(profile), predicted_ms_per_token(profile)
    if measured is not None and predicted is not None:
        lines.append(f"per token after the first: measured {measured:.2f} ms, theory from this run's step costs "
                     f"{predicted:.2f} ms (measured/theory {measured / predicted:.2f})")
    for process in profile.processes:
        if process.name != "coord":
            lines.append(f"clock of {process.name}: offset {process.clock.offset_s * 1e6:+.0f} µs "
                         f"± {process.clock.error_s * 1e6:.0f} µs from the coordinator's")
        if process.dropped:
            lines.append(f"{process.name}: {process.dropped} spans dropped (raise --max-spans)")
    lines += speculation_lines(profile.speculation, profile.speculation_events)
    lines.append(f"trace: {trace_path} (open in ui.perfetto.dev or chrome://tracing)")
    return lines


def speculation_lines(summary: dict | None, events: list[str]) -> list[str]:
    """What the goodput controller decided: its mean k, how often it drafted nothing, and every time it
    switched speculation off (a draft that no longer paid) or on again."""
    if not summary:
        return []
    predicted = summary.get("predicted_speedup")
    lines = [f"goodput controller: {summary['plans']} plans, mean k {summary['mean_k']:.2f}, k = 0 for "
             f"{100 * summary['zero_k_share']:.0f}% of sequence-steps"
             + (f", predicted speedup {predicted:.2f}x over target-only" if predicted else "")]
    off = summary["speculation_off_events"]
    lines.append(f"speculation switched off {off} time(s), {summary['speculation_off_s']:.2f} s in all"
                 if off else "speculation never switched off (the draft paid throughout)")
    lines += [f"  {event}" for event in events]
    return lines
