"""Both workers in the coordinator's own process: the whole algorithm, no sockets (for tests)."""

from __future__ import annotations

from workers.model.runner_base import RunnerBase
from workers.protocol.codec import decode, encode
from workers.service import WorkerService


class LocalTransport:
    """Runs requests on in-process WorkerServices when the engine waits, in submission order.

    Deferring to `wait` lets the engine hand both workers their requests first, as it would with
    real processes, so overlap mode pre-drafts here too. With `through_wire` every message makes
    the msgpack round trip it would make over a socket.
    """

    def __init__(self, draft: RunnerBase | None, target: RunnerBase, through_wire: bool = True,
                 draft_first: bool = False, one_at_a_time: bool = False) -> None:
        self.services = {"target": WorkerService("target", target)}
        if draft is not None:
            self.services["draft"] = WorkerService("draft", draft)
        self.through_wire = through_wire
        # Which worker answers first when both have a request: the target (as if every verification were
        # quicker than the drafting behind it), or the draft (as if drafting ahead always finished in time).
        self.draft_first = draft_first
        # One reply per wait, so that the engine reacts to each before the next worker answers (as with
        # real processes, where a VerifyNext can reach the target while it is still verifying).
        self.one_at_a_time = one_at_a_time
        self._queued: list[tuple[str, object]] = []

    def submit(self, role: str, message: object) -> None:
        self._queued.append((role, decode(encode(message)) if self.through_wire else message))

    def wait(self, timeout_s: float, busy: frozenset[str] = frozenset()) -> list[tuple[str, object]]:
        replies = []
        queued, self._queued = self._queued, []
        if self.draft_first:
            queued.sort(key=lambda item: item[0] != "draft")  # stable: each worker keeps its own order
        if self.one_at_a_time:
            queued, self._queued = queued[:1], queued[1:]
        for role, message in queued:
            reply = self.services[role].handle(message)
            replies.append((role, decode(encode(reply)) if self.through_wire else reply))
        return replies
