"""Spans of three processes on one time axis, as a Chrome / Perfetto trace (the trace-event format).

Each process records spans on its own time.perf_counter() clock. To put them on the coordinator's,
each worker's offset is estimated the way NTP does: the coordinator reads its clock (t0), asks the
worker for its clock (w) and reads its own again on the reply (t1). If the two legs took equally
long, the worker read its clock at coordinator time (t0 + t1) / 2, so

    offset = w - (t0 + t1) / 2,   uncertain by at most (t1 - t0) / 2,

whatever the legs' split. The probe with the shortest round trip bounds the error best and is kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime.transport import ZmqTransport
from workers.protocol.messages import (
    ClockProbe,
    ClockReading,
    ErrorReply,
    Span,
    TraceCollect,
    TraceSpans,
    TraceStart,
    TraceStarted,
)


@dataclass(frozen=True)
class ClockOffset:
    offset_s: float  # worker clock minus coordinator clock
    error_s: float  # half the round trip of the probe it came from: the bound on |true - estimate|


@dataclass(frozen=True)
class ProcessSpans:
    """One process's spans, and how to put them on the coordinator's clock."""

    name: str  # "coord", "draft" or "target"
    pid: int
    spans: list[Span]
    clock: ClockOffset = ClockOffset(0.0, 0.0)
    dropped: int = 0

    def aligned(self) -> list[Span]:
        """The spans with start_s on the coordinator's clock."""
        return [Span(s.name, s.lane, s.start_s - self.clock.offset_s, s.duration_s, s.seq_id, s.size)
                for s in self.spans]


def estimate_offset(probes: list[tuple[float, float, float]]) -> ClockOffset:
    """From (t0, worker_clock, t1) triples: the estimate of the probe with the shortest round trip."""
    if not probes:
        raise ValueError("no clock probes to estimate an offset from")
    t0, worker, t1 = min(probes, key=lambda probe: probe[2] - probe[0])
    if t1 < t0:
        raise ValueError(f"a clock probe came back before it was sent ({t0} > {t1})")
    return ClockOffset(worker - (t0 + t1) / 2, (t1 - t0) / 2)


# --- talking to the workers ------------------------------------------------------------------------


def _ask(transport: ZmqTransport, role: str, message: object, expected: type, timeout_s: float = 10.0) -> object:
    transport.submit(role, message)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # busy: the coordinator must not spin on a core it shares with this worker, or the worker
        # (niced there) hardly runs and the probes' round trips, the offset's error bound, grow to ms
        for replied, reply in transport.wait(max(0.0, deadline - time.monotonic()), busy=frozenset({role})):
            if isinstance(reply, ErrorReply):
                raise RuntimeError(f"[{replied}] {reply.message}")
            if replied == role and isinstance(reply, expected):
                return reply
    raise TimeoutError(f"the {role} worker did not answer {type(message).__name__} within {timeout_s:.0f} s")


def measure_offset(transport: ZmqTransport, role: str, probes: int = 64) -> ClockOffset:
    samples = []
    for nonce in range(probes):
        began = time.perf_counter()
        reading = _ask(transport, role, ClockProbe(nonce), ClockReading)
        samples.append((began, reading.clock_s, time.perf_counter()))
    return estimate_offset(samples)


def start_tracing(transport: ZmqTransport, roles: list[str], capacity: int) -> None:
    for role in roles:
        _ask(transport, role, TraceStart(capacity), TraceStarted)


def collect_spans(transport: ZmqTransport, role: str) -> tuple[list[Span], int]:
    reply = _ask(transport, role, TraceCollect(), TraceSpans, timeout_s=30.0)
    return reply.spans, reply.dropped


# --- the trace-event format ------------------------------------------------------------------------

LANE_NAMES = {"": "main loop"}


def chrome_trace(processes: list[ProcessSpans], origin_s: float, metadata: dict[str, object]) -> dict[str, object]:
    """A trace-event JSON object (chrome://tracing, ui.perfetto.dev): one process track per process,
    one thread track per lane, an "X" (complete) event per span; times in microseconds from `origin_s`
    on the coordinator's clock."""
    events: list[dict[str, object]] = []
    for order, process in enumerate(processes):
        lanes: dict[str, int] = {"": 0}
        for span in process.spans:
            lanes.setdefault(span.lane, len(lanes))
        label = f"{process.name} (pid {process.pid})"
        if process.name != "coord":
            label += f", clock offset {process.clock.offset_s * 1e6:+.0f} ± {process.clock.error_s * 1e6:.0f} µs"
        events.append({"ph": "M", "name": "process_name", "pid": process.pid, "args": {"name": label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": process.pid, "args": {"sort_index": order}})
        for lane, tid in lanes.items():
            events.append({"ph": "M", "name": "thread_name", "pid": process.pid, "tid": tid,
                           "args": {"name": LANE_NAMES.get(lane, lane)}})
        for span in process.aligned():
            args: dict[str, int] = {}
            if span.seq_id >= 0:
                args["seq"] = span.seq_id
            if span.size:
                args["tokens"] = span.size
            events.append({"ph": "X", "name": span.name, "cat": process.name, "pid": process.pid,
                           "tid": lanes[span.lane], "ts": round((span.start_s - origin_s) * 1e6, 3),
                           "dur": round(span.duration_s * 1e6, 3), "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": metadata}


def write_trace(path: Path, trace: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace, separators=(",", ":")))
