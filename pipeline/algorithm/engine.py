"""The loop that moves requests between the scheduler and the two workers, whatever carries them."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pipeline.algorithm.scheduler import Scheduler
from pipeline.algorithm.sequence import Sequence
from pipeline.errors import Stalled, WorkerFailed
from workers.protocol.messages import (
    DraftBatch,
    DraftBatchResult,
    ErrorReply,
    Release,
    Released,
    TargetBatch,
    TargetBatchResult,
    batch_items,
    request_kind,
    request_sequence,
)
from workers.spans import SpanRecorder

LAST_REPLIES = 8  # replies a stall report quotes
DISPATCH_ORDER = ("target", "draft")  # the target is the bottleneck: it gets its next request first
REQUESTS = (TargetBatch, DraftBatch)  # work for a model: every sequence's, one batch at a time
RESULTS = (TargetBatchResult, DraftBatchResult)


@dataclass(frozen=True)
class Trip:
    """One batch's way to a worker and back, as the coordinator saw it."""

    role: str
    kind: str  # "prefill", "decode" (no drafted tokens), "verify", "chained", "draft" or "speculate"
    size: int  # drafted tokens verified, tokens asked of the draft, or prompt tokens read (see request_kind)
    busy_s: float  # the worker's compute, as it reported
    round_trip_s: float  # send to reply: compute plus IPC, (de)serialization and queueing
    sequences: int = 1  # in the batch
    rows: int = 0  # rows of all its forward passes
    steps: int = 1  # forward passes


class Transport(Protocol):
    """Carries messages to the draft and target workers and brings their replies back, in order."""

    def submit(self, role: str, message: object) -> None: ...

    def wait(self, timeout_s: float, busy: frozenset[str] = frozenset()) -> list[tuple[str, object]]:
        """Replies that arrived, as (role, reply); empty if none came within timeout_s."""
        ...


class Engine:
    """Keeps each worker busy as the scheduler directs: one batch at a time, plus, at the target, a batch of
    VerifyNexts queued behind the verifications they continue. Each batch's measured round trip goes back
    to the scheduler (the goodput controller's costs); an item that fails fails its sequence alone."""

    def __init__(
        self, scheduler: Scheduler, transport: Transport, poll_s: float = 0.5, stop: Callable[[], bool] | None = None,
        spans: SpanRecorder | None = None, trips_kept: int | None = None,
        clock: Callable[[], float] = time.perf_counter, on_stall: Callable[[str], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.clock = clock  # round trips and the coordinator's own time (a test drives it by hand)
        self.spans = spans or SpanRecorder()  # `specpipe profile` starts it; idle otherwise
        self.stop = stop  # checked between replies: True cancels the generation (see cancel)
        self.transport = transport
        self.busy = {role: 0 for role in DISPATCH_ORDER}  # requests sent and not yet answered
        self.poll_s = poll_s
        self.coordinator_s = 0.0  # time spent scheduling and bookkeeping
        self.releases_pending = 0
        self.busy_s = {role: 0.0 for role in DISPATCH_ORDER}  # time each worker reported computing
        self.overhead_s = {role: 0.0 for role in DISPATCH_ORDER}  # round trip minus compute: IPC, (de)serialization
        self._startable_at: dict[int, float] = {}  # sent, or (queued behind another) when that one was answered
        self._queued: dict[str, list[int]] = {role: [] for role in DISPATCH_ORDER}  # unanswered requests, in order
        self._kinds: dict[int, tuple[str, int, int, int]] = {}  # kind, size, sequences, one sequence's id
        # every batch, in the order answered (a server keeps the last `trips_kept`)
        self.trips: deque[Trip] = deque(maxlen=trips_kept)
        self.failures: deque[str] = deque(maxlen=trips_kept)  # "[role] request N: what the worker said", per item
        # workers that may hold the CPU during this run: a draft spins between its requests
        self.in_use = frozenset(scheduler.roles)
        # A stall (see `_stalled`) raises Stalled; with on_stall (a server's log) the stalled sequences fail
        # instead, on_stall hears why, and the engine goes on.
        self.on_stall = on_stall
        self.last_replies: deque[tuple[str, object]] = deque(maxlen=LAST_REPLIES)  # what a stall report quotes

    def run(self) -> None:
        """Runs until every sequence is finished and both workers have freed its slots."""
        while not self.idle:
            if self.stop is not None and self.stop():
                return self.cancel()
            self.step()

    @property
    def idle(self) -> bool:
        """Nothing to do and nothing awaited: every sequence finished, every release confirmed."""
        return self.scheduler.done and not self.releases_pending

    def step(self) -> None:
        """Sends what the scheduler has for each worker, then takes the replies that come within poll_s
        (a server calls this in its own loop, adding and cancelling sequences between steps)."""
        began = self.clock()
        self._dispatch()
        ended = self.clock()
        self.coordinator_s += ended - began
        self.spans.add("schedule", began, ended)
        if not self._awaiting:
            # The draft's turn can leave work for the target, whose turn has passed (a sequence with nothing
            # left to draft becomes a plain step): one more round before calling it a stall.
            self._dispatch()
            if not self._awaiting:
                return self._stalled()
        for role, reply in self.transport.wait(self.poll_s, self.in_use):
            began = self.clock()
            self._take(role, reply)
            ended = self.clock()
            self.coordinator_s += ended - began
            self.spans.add("take", began, ended, getattr(reply, "seq_id", -1))

    @property
    def _awaiting(self) -> bool:
        """A request or a release is at a worker: a reply will come."""
        return any(self.busy.values()) or self.releases_pending > 0

    def cancel(self, timeout_s: float = 1.0) -> None:
        """Marks every unfinished sequence "cancelled" and frees all KV slots in every worker.

        Requests in flight are answered before the releases sent after them (a worker serves in
        order); their results are dropped. Returns once every worker confirmed, or after timeout_s.
        """
        admitted = self.scheduler.cancel()  # its queued releases are dropped: all are sent here
        for role in self.scheduler.roles:
            for seq_id in admitted:
                self.transport.submit(role, Release(seq_id))
                self.releases_pending += 1
        deadline = time.monotonic() + timeout_s
        while (self.releases_pending or any(self.busy.values())) and time.monotonic() < deadline:
            for role, reply in self.transport.wait(max(0.0, deadline - time.monotonic())):
                if isinstance(reply, RESULTS):
                    self.busy[role] -= 1
                else:
                    self._take(role, reply)

    def _stalled(self) -> None:
        """Nothing sent and nothing awaited while sequences remain: no reply will ever move them. Raises
        Stalled naming them, or (with on_stall) ends them with that error, so that their releases go out
        and every other sequence, and any that arrive later, are served."""
        stuck = self.scheduler.active
        lines = [f"  {describe(sequence)}" for sequence in stuck]
        if self.scheduler.waiting:
            lines.append(f"  {len(self.scheduler.waiting)} more waiting to be admitted")
        replies = [f"  [{role}] {summarize(reply)}" for role, reply in self.last_replies] or ["  none"]
        lines += ["last replies, oldest first:", *replies]
        message = ("coordinator stalled: no worker is busy and the scheduler has nothing to send for "
                   f"{len(stuck)} sequence(s); please report this with the lines below\n" + "\n".join(lines))
        if self.on_stall is None:
            raise Stalled(message, [sequence.seq_id for sequence in stuck])
        for sequence in stuck:  # the report goes to the log; each request's stream gets one line
            self.scheduler.fail(sequence.seq_id, "the coordinator stalled on this request (a bug in specpipe's "
                                                 "scheduler); the server's log has the report")
        self.scheduler.forget_in_flight()  # nothing is at a worker: whatever the scheduler still awaits never comes
        self.failures.append(message)
        self.on_stall(message)

    def _dispatch(self) -> None:
        for role in DISPATCH_ORDER:
            while self._send_next(role):
                pass

    def _send_next(self, role: str) -> bool:
        """Sends the worker its next request or release, if the scheduler has one."""
        request = self.scheduler.next_request(role, self.busy[role])
        if request is None:
            return False
        if isinstance(request, REQUESTS):
            self._kinds[request.request_id] = (*request_kind(request), _sequences(request),
                                               request_sequence(request))
            self._startable_at[request.request_id] = self.clock()
            self._queued[role].append(request.request_id)
            self.busy[role] += 1
        else:
            self.releases_pending += 1
        self.transport.submit(role, request)
        return True

    def _answered(self, role: str, request_id: int, now: float) -> None:
        self.busy[role] -= 1
        self._queued[role].remove(request_id)
        for waiting in self._queued[role]:  # a worker serves in order: the next one starts only now
            self._startable_at[waiting] = max(self._startable_at[waiting], now)

    def _take(self, role: str, reply: object) -> None:
        self.last_replies.append((role, reply))
        if isinstance(reply, RESULTS):
            now = self.clock()
            started = self._startable_at.pop(reply.request_id)  # the queueing is not the worker's
            round_trip = now - started
            kind, size, sequences, seq_id = self._kinds.pop(reply.request_id)
            steps = reply.steps if isinstance(reply, DraftBatchResult) else 1
            self.trips.append(Trip(role, kind, size, reply.busy_s, round_trip, sequences, reply.rows, steps))
            # a chained verification's own lane: the target began it before we heard of the one it follows
            lane = f"{role} requests" + (" (chained)" if kind == "chained" else "")
            self.spans.add(kind, started, now, seq_id, size, lane=lane)
            self.busy_s[role] += reply.busy_s
            self.overhead_s[role] += max(0.0, round_trip - reply.busy_s)
            self._answered(role, reply.request_id, now)
            for error in reply.errors:
                self.failures.append(f"[{role}] request {error.request_id}: {error.message}")
            self.scheduler.observe_pass(role, reply.rows, steps, round_trip)
            self.scheduler.on_reply(reply)
        elif isinstance(reply, Released):
            self.releases_pending -= 1
        elif isinstance(reply, ErrorReply):
            raise WorkerFailed(f"[{role}] {reply.message}")
        else:
            raise WorkerFailed(f"[{role}] unexpected reply {type(reply).__name__}")


def describe(sequence: Sequence) -> str:
    """One sequence as a stall report shows it."""
    verification = sequence.verification
    parts = [f"sequence {sequence.seq_id}: {sequence.phase.value}", f"k {sequence.k}",
             f"{len(sequence.generated)}/{sequence.max_new_tokens} tokens"]
    if sequence.window is not None:
        parts.append(f"window of {len(sequence.window)}")
    if verification is not None:
        ahead = verification.ahead
        parts.append(f"verification {verification.request_id}" + (
            "" if ahead is None else f", drafted ahead by {ahead.request_id} "
            f"({'back' if ahead.branches is not None else 'at the draft'}"
            f"{'' if ahead.chain is None else f', chained as {ahead.chain.request_id}'})"))
    return ", ".join(parts)


def summarize(reply: object) -> str:
    """One reply as a stall report quotes it: what each item said."""
    if isinstance(reply, TargetBatchResult):
        items = [f"verified seq {r.seq_id} ({r.accepted} accepted, next {r.next_token})" for r in reply.verified]
        items += [f"prefilled seq {r.seq_id}" for r in reply.prefilled]
        items += [f"skipped seq {r.seq_id}" for r in reply.skipped]
    elif isinstance(reply, DraftBatchResult):
        items = [f"drafted {len(r.tokens)} for seq {r.seq_id}" for r in reply.drafted]
        items += [f"drafted ahead {len(r.heads)} branches for seq {r.seq_id}" for r in reply.speculated]
    else:
        return type(reply).__name__ + (f" seq {reply.seq_id}" if hasattr(reply, "seq_id") else "")
    items += [f"error for request {e.request_id}" for e in reply.errors]
    return f"batch {reply.request_id}: " + ("; ".join(items) or "no items")


def _sequences(batch: TargetBatch | DraftBatch) -> int:
    """How many sequences the batch is for."""
    return len({item.seq_id for item in batch_items(batch)})
