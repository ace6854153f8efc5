"""Recording where a process's time goes, for `specpipe profile`: off (and nearly free) until started."""

from __future__ import annotations

from workers.protocol.limits import MAX_TRACE_SPANS
from workers.protocol.messages import Span


class SpanRecorder:
    """Spans on this process's time.perf_counter() clock, kept between start() and collect()."""

    def __init__(self) -> None:
        self.active = False
        self.capacity = 0
        self.dropped = 0
        self._spans: list[Span] = []

    def start(self, capacity: int = MAX_TRACE_SPANS) -> None:
        if not 1 <= capacity <= MAX_TRACE_SPANS:
            raise ValueError(f"trace capacity {capacity} is not between 1 and {MAX_TRACE_SPANS}")
        self.active, self.capacity, self.dropped, self._spans = True, capacity, 0, []

    def add(self, name: str, began: float, ended: float, seq_id: int = -1, size: int = 0, lane: str = "") -> None:
        if not self.active:
            return
        if len(self._spans) >= self.capacity:
            self.dropped += 1
            return
        self._spans.append(Span(name, lane, began, ended - began, seq_id, size))

    def collect(self) -> tuple[list[Span], int]:
        """Stops recording; returns the spans in the order they ended, and how many were dropped."""
        spans, dropped = self._spans, self.dropped
        self.active, self._spans, self.dropped = False, [], 0
        return spans, dropped
