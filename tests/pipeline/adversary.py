"""Two in-process workers whose replies reach the engine in whatever order and timing a test draws.

A worker serves its requests in the order it received them (as a worker process does), but when its
replies arrive, relative to the other worker's and to the engine's next step, is the adversary's choice:
at each `wait` it picks which worker answers next, one reply at a time, and when to hand the replies so
far to the engine. That covers every legal interleaving: the draft or the target first, one reply per
step or several, a VerifyNext reaching the target while it verifies or after, drafting ahead finishing
before or after its verification. Each reply costs a drawn time on a hand-driven clock, so the goodput
controller learns whatever costs the adversary likes. It may also fail single items of a batch, as a
worker does for a request it cannot serve.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable

from pipeline.algorithm.speculation import SpeculationPlan
from workers.protocol.codec import decode, encode
from workers.protocol.messages import (
    DraftBatch,
    DraftBatchResult,
    ErrorReply,
    Release,
    TargetBatch,
    TargetBatchResult,
    batch_items,
)
from workers.service import WorkerService

# a reply's cost, in seconds, per role: cheap and dear passes, so that costs and overlap both vary
COSTS = {"target": (0.002, 0.004, 0.02), "draft": (0.0005, 0.002, 0.03)}
ITEM_LISTS = {TargetBatchResult: ("prefilled", "verified"), DraftBatchResult: ("drafted", "speculated")}


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Choices:
    """The adversary's decisions: drawn one by one (from Hypothesis, which then shrinks them towards 0), or
    replayed from a tape recorded by an earlier run (the regression tests). Every decision made is recorded
    in `tape`; past a replayed tape's end, every choice is 0."""

    def __init__(self, tape: list[int] | None = None, draw: Callable[[str, int], int] | None = None) -> None:
        self.replay = list(tape or [])
        self.draw = draw
        self.tape: list[int] = []

    def pick(self, what: str, count: int) -> int:
        """An index below `count` (`what` says what is being chosen); 0 is the simplest choice."""
        if count <= 1:
            return 0
        if self.draw is not None:
            value = self.draw(what, count)
        else:
            value = self.replay[len(self.tape)] % count if len(self.tape) < len(self.replay) else 0
        self.tape.append(value)
        return value


class AdversarialTransport:
    """The engine's Transport over in-process WorkerServices, replies ordered and timed by `choices`."""

    def __init__(self, services: dict[str, WorkerService], choices: Choices, clock: ManualClock,
                 item_errors: bool = False) -> None:
        self.services = services
        self.choices = choices
        self.clock = clock
        self.item_errors = item_errors
        self.pending: dict[str, deque[object]] = {role: deque() for role in services}
        self.request_ids: set[int] = set()  # every batch and item id sent: none may be sent twice
        self.item_owners: dict[int, int] = {}  # item request id -> its sequence
        self.released: dict[str, list[int]] = {role: [] for role in services}
        self.failed_items: list[int] = []  # request ids of the items made to fail

    def submit(self, role: str, message: object) -> None:
        if isinstance(message, (TargetBatch, DraftBatch)):
            for request_id in [message.request_id, *(item.request_id for item in batch_items(message))]:
                assert request_id not in self.request_ids, f"request {request_id} sent twice"
                self.request_ids.add(request_id)
            self.item_owners.update((item.request_id, item.seq_id) for item in batch_items(message))
        elif isinstance(message, Release):
            self.released[role].append(message.seq_id)
        self.pending[role].append(decode(encode(message)))  # the msgpack round trip a socket makes

    def wait(self, timeout_s: float, busy: frozenset[str] = frozenset()) -> list[tuple[str, object]]:
        replies: list[tuple[str, object]] = []
        while True:
            answering = [role for role in self.pending if self.pending[role]]
            if not answering:
                if not replies:
                    self.clock.advance(timeout_s)  # nothing was asked: the wait times out
                return replies
            role = answering[self.choices.pick("which worker answers next", len(answering))]
            reply = self.services[role].handle(self.pending[role].popleft())
            if self.item_errors and type(reply) in ITEM_LISTS:
                reply = self._maybe_fail_an_item(reply)
            costs = COSTS[role]
            self.clock.advance(costs[self.choices.pick(f"{role} reply cost", len(costs))])
            replies.append((role, decode(encode(reply))))
            if self.choices.pick("the engine takes the replies so far", 2):
                return replies

    def _maybe_fail_an_item(self, reply: TargetBatchResult | DraftBatchResult) -> object:
        items = [(name, i) for name in ITEM_LISTS[type(reply)] for i in range(len(getattr(reply, name)))]
        chosen = self.choices.pick("an item of the batch fails", 8 * len(items) + 1) - 1
        if chosen < 0 or chosen >= len(items):
            return reply
        name, index = items[chosen]
        kept = list(getattr(reply, name))
        failed = kept.pop(index)
        self.failed_items.append(failed.request_id)
        error = ErrorReply(failed.request_id, "ValueError: the adversary failed this item", fatal=False)
        return dataclasses.replace(reply, **{name: kept, "errors": [*reply.errors, error]})


class DrawnPlans:
    """A goodput controller whose every plan is drawn: any k from 0 to the cap for each sequence, changing
    at every replan (the real controller's decisions are some of these)."""

    def __init__(self, choices: Choices, cap: int) -> None:
        self.choices = choices
        self.cap = cap

    def plan(self, seq_ids: list[int], branches: int = 1, prompt_rows: int = 0) -> SpeculationPlan:
        ks = {seq_id: self.cap - self.choices.pick("a sequence's k", self.cap + 1) for seq_id in seq_ids}
        return SpeculationPlan(ks, None, None, "drawn")

    def observe_target(self, rows: int, seconds: float) -> None:
        pass

    def observe_draft(self, rows_per_step: float, steps: int, seconds: float) -> None:
        pass

    def observe_acceptance(self, seq_id: int, drafted: int, accepted: int) -> None:
        pass

    def observe_predraft(self, hit: bool) -> None:
        pass

    def forget(self, seq_id: int) -> None:
        pass

    def summary(self) -> dict[str, object]:
        return {}
