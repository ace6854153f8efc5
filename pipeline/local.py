"""Both workers in the coordinator's own process: the whole algorithm, no sockets (for tests)."""

from __future__ import annotations

from pipeline.protocol import decode, encode
from workers.model.runner import ModelRunner
from workers.service import WorkerService


class LocalTransport:
    """Runs requests on in-process WorkerServices when the engine waits, in submission order.

    Deferring to `wait` lets the engine hand both workers their requests first, as it would with
    real processes, so overlap mode pre-drafts here too. With `through_wire` every message makes
    the msgpack round trip it would make over a socket.
    """

    def __init__(self, draft: ModelRunner | None, target: ModelRunner, through_wire: bool = True) -> None:
        self.services = {"target": WorkerService("target", target)}
        if draft is not None:
            self.services["draft"] = WorkerService("draft", draft)
        self.through_wire = through_wire
        self._queued: list[tuple[str, object]] = []

    def submit(self, role: str, message: object) -> None:
        self._queued.append((role, decode(encode(message)) if self.through_wire else message))

    def wait(self, timeout_s: float, busy: frozenset[str] = frozenset()) -> list[tuple[str, object]]:
        replies = []
        queued, self._queued = self._queued, []
        for role, message in queued:
            reply = self.services[role].handle(message)
            replies.append((role, decode(encode(reply)) if self.through_wire else reply))
        return replies
