"""The loop that moves requests between the scheduler and the two workers, whatever carries them."""

from __future__ import annotations

import time
from typing import Protocol

from pipeline.protocol import DraftRequest, DraftResult, ErrorReply, Released, VerifyRequest, VerifyResult
from pipeline.scheduler import Scheduler

ROLES = ("target", "draft")  # the target is the bottleneck: it gets its next request first


class WorkerFailed(RuntimeError):
    """A worker answered with an error the request cannot recover from."""


class Transport(Protocol):
    """Carries messages to the draft and target workers and brings their replies back, in order."""

    def submit(self, role: str, message: object) -> None: ...

    def wait(self, timeout_s: float) -> list[tuple[str, object]]:
        """Replies that arrived, as (role, reply); empty if none came within timeout_s."""
        ...


class Engine:
    """Keeps each worker busy with at most one request, as the scheduler directs."""

    def __init__(self, scheduler: Scheduler, transport: Transport, poll_s: float = 0.5) -> None:
        self.scheduler = scheduler
        self.transport = transport
        self.busy = {role: False for role in ROLES}
        self.poll_s = poll_s
        self.coordinator_s = 0.0  # time spent scheduling and bookkeeping
        self.releases_pending = 0
        self.busy_s = {role: 0.0 for role in ROLES}  # time each worker reported computing
        self.overhead_s = {role: 0.0 for role in ROLES}  # round trip minus compute: IPC, (de)serialization
        self.requests = {role: 0 for role in ROLES}
        self._sent_at: dict[int, float] = {}

    def run(self) -> None:
        """Runs until every sequence is finished and both workers have freed its slots."""
        while not self.scheduler.done or self.releases_pending:
            began = time.perf_counter()
            self._dispatch()
            self.coordinator_s += time.perf_counter() - began
            if not any(self.busy.values()) and not self.releases_pending:
                raise RuntimeError("coordinator stalled: no worker is busy and the scheduler has nothing to send")
            for role, reply in self.transport.wait(self.poll_s):
                began = time.perf_counter()
                self._take(role, reply)
                self.coordinator_s += time.perf_counter() - began

    def _dispatch(self) -> None:
        for role in ROLES:
            while not self.busy[role]:
                request = self.scheduler.next_request(role)
                if request is None:
                    break
                if isinstance(request, (DraftRequest, VerifyRequest)):
                    self._sent_at[request.request_id] = time.perf_counter()
                self.transport.submit(role, request)
                if isinstance(request, (DraftRequest, VerifyRequest)):
                    self.busy[role] = True
                    self.requests[role] += 1
                else:
                    self.releases_pending += 1

    def _take(self, role: str, reply: object) -> None:
        if isinstance(reply, (DraftResult, VerifyResult)):
            round_trip = time.perf_counter() - self._sent_at.pop(reply.request_id)
            self.busy_s[role] += reply.busy_s
            self.overhead_s[role] += max(0.0, round_trip - reply.busy_s)
            self.busy[role] = False
            self.scheduler.on_reply(reply)
        elif isinstance(reply, Released):
            self.releases_pending -= 1
        elif isinstance(reply, ErrorReply):
            raise WorkerFailed(f"[{role}] {reply.message}")
        else:
            raise WorkerFailed(f"[{role}] unexpected reply {type(reply).__name__}")
