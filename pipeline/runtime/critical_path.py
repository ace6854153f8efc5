"""Where the target's wall time went, from a trace: what the coordinator and IPC cost the user.

The target is the pipeline's bottleneck: every millisecond it does not compute is a millisecond
more of wall time, and every millisecond of coordinator or IPC work it does not wait for costs
nothing (the coordinator runs on the draft's core, beside the target's compute). So the cost of
coordination is measured on the target's timeline, each instant of the traced window put in one
bucket, the first that applies:

  compute              a forward pass (prefill, decode, verify, chained verify)
  target messages      its own receive, unpack, pack and send of a request, or a release
  coordinator          idle while the coordinator ran (it shares the draft's core, so the draft
                       stood still too)
  draft compute        idle while the draft drafted: the window after a miss, a late speculation
  draft messages       idle while the draft received, unpacked, packed or sent
  in flight            idle while no process worked on it: messages crossing the sockets,
                       threads waking, the gaps between a loop's spans

coordinator and IPC = target messages + coordinator + draft messages + in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.protocol.messages import Span

Intervals = list[tuple[float, float]]  # sorted, disjoint

COMPUTE = ("prefill", "decode", "verify", "chained")
MESSAGES = ("recv", "unpack", "pack", "send", "release")
DRAFTING = ("draft", "speculate")
COORDINATOR_IDLE = ("wait",)  # the coordinator's loop spans other than this one are its work


def merged(intervals: list[tuple[float, float]]) -> Intervals:
    out: Intervals = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def intersect(a: Intervals, b: Intervals) -> Intervals:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Intervals, b: Intervals) -> Intervals:
    out, j = [], 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > start:
                out.append((start, b[k][0]))
            start = max(start, b[k][1])
            k += 1
        if start < end:
            out.append((start, end))
    return out


def length(intervals: Intervals) -> float:
    return sum(end - start for start, end in intervals)


def _where(spans: list[Span], keep) -> Intervals:
    return merged([(s.start_s, s.start_s + s.duration_s) for s in spans if not s.lane and keep(s.name)])


TARGET_BUCKETS = ("compute", "target_messages", "coordinator", "draft_compute", "draft_messages", "in_flight")


@dataclass(frozen=True)
class TargetTimeSplit:
    """Seconds of the target's wall in each bucket (they add up to wall_s)."""

    wall_s: float
    compute_s: float
    target_messages_s: float
    coordinator_s: float
    draft_compute_s: float
    draft_messages_s: float
    in_flight_s: float

    @property
    def coordination_s(self) -> float:
        """What the coordinator and IPC cost the wall: the target waited on them or did them."""
        return self.target_messages_s + self.coordinator_s + self.draft_messages_s + self.in_flight_s

    def share(self, seconds: float) -> float:
        return seconds / self.wall_s if self.wall_s > 0 else 0.0


def split_target_time(target: list[Span], coordinator: list[Span], draft: list[Span],
                      window: tuple[float, float]) -> TargetTimeSplit:
    """Buckets every instant of `window` on the target's timeline; all spans on one clock."""
    whole = [window] if window[1] > window[0] else []
    compute = intersect(_where(target, lambda name: name in COMPUTE), whole)
    messages = subtract(intersect(_where(target, lambda name: name in MESSAGES), whole), compute)
    idle = subtract(subtract(whole, compute), messages)
    buckets = []
    for spans, keep in ((coordinator, lambda name: name not in COORDINATOR_IDLE),
                        (draft, lambda name: name in DRAFTING),
                        (draft, lambda name: name in MESSAGES)):
        taken = intersect(idle, _where(spans, keep))
        buckets.append(length(taken))
        idle = subtract(idle, taken)
    return TargetTimeSplit(window[1] - window[0], length(compute), length(messages), *buckets, length(idle))


def split_lines(split: TargetTimeSplit) -> list[str]:
    def part(name: str, seconds: float) -> str:
        return f"{name} {100 * split.share(seconds):.1f}%"

    parts = [part("its own message handling", split.target_messages_s), part("the coordinator", split.coordinator_s),
             part("the draft's messages", split.draft_messages_s), part("in flight", split.in_flight_s)]
    return [
        f"target's wall: {part('compute', split.compute_s)}, {part('waiting for the draft', split.draft_compute_s)}, "
        f"{part('coordinator and IPC', split.coordination_s)}",
        f"  coordinator and IPC: {', '.join(parts)}",
    ]
