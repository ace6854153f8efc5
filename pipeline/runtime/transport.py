"""The coordinator's end of the sockets: one DEALER per worker, replies gathered with one poller."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import zmq

from pipeline.errors import WorkerFailed
from pipeline.runtime.liveness import ConnectionWatch, Heartbeats, describe_activity
from workers.curve import ClientKeys
from workers.protocol.codec import ProtocolError, decode, encode
from workers.protocol.limits import MAX_MESSAGE_BYTES, MAX_QUEUED_REPLIES
from workers.protocol.messages import ErrorReply, Hello, Ready, Shutdown
from workers.spans import SpanRecorder
from workers.spin import Spinner

LAST_WORDS_S = 0.1  # after a worker exits or drops its connection: time for its last messages to arrive


class ZmqTransport:
    def __init__(
        self,
        addresses: dict[str, str],
        health_check: Callable[[], None] | None = None,
        spin_s: float = 0.0,
        heartbeats: Heartbeats = Heartbeats(),
        shares_core_with: frozenset[str] = frozenset(),
        sentinels: dict[str, int] | None = None,
        curve: dict[str, ClientKeys] | None = None,
    ) -> None:
        """`health_check` raises WorkerFailed for a worker process that is gone; `sentinels` are fds
        (pidfds) readable once a worker process has exited, which wake `wait` at once; `curve` holds
        the keys for the workers reached over CURVE."""
        self.context = zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}
        self.poller = zmq.Poller()
        self.health_check = health_check
        self.spinner = Spinner(spin_s)  # busy-polls up to spin_s before blocking, on a core no other task wants
        self.shares_core_with = shares_core_with  # workers on our core: no spinning while they are in use
        self.spans = SpanRecorder()  # `specpipe profile` starts it
        self.addresses = dict(addresses)
        self.heartbeats = heartbeats
        self.ready: dict[str, Ready] = {}
        self.lost: set[str] = set()  # workers found dead or hung: not worth a Shutdown
        self.watches: dict[str, ConnectionWatch] = {}
        self._outstanding: dict[str, list[object]] = {role: [] for role in addresses}  # sent, not yet answered
        for role, address in addresses.items():
            socket = self.context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            socket.setsockopt(zmq.RCVHWM, MAX_QUEUED_REPLIES)
            heartbeats.arm(socket)
            self.watches[role] = ConnectionWatch(socket)  # before connecting, so that no event is missed
            if curve and role in curve:
                curve[role].apply(socket)
            socket.connect(address)
            self.sockets[role] = socket
            self.poller.register(socket, zmq.POLLIN)
        self._role_of = {socket: role for role, socket in self.sockets.items()}
        self._replies_poller = zmq.Poller()  # the worker sockets alone
        for socket in self.sockets.values():
            self._replies_poller.register(socket, zmq.POLLIN)
        self._sentinels = list((sentinels or {}).values())
        self._alarms: list[object] = [watch.monitor for watch in self.watches.values()] + self._sentinels
        for alarm in self._alarms:
            self.poller.register(alarm, zmq.POLLIN)

    def submit(self, role: str, message: object, block: bool = True) -> None:
        """Sends `message`; with block=False raises zmq.Again at once when the worker is not connected."""
        began = time.perf_counter()
        payload = encode(message)
        self.sockets[role].send(payload, 0 if block else zmq.NOBLOCK)
        if not isinstance(message, Shutdown):
            self._outstanding[role].append(message)
        self.spans.add(f"send {role}", began, time.perf_counter(), getattr(message, "seq_id", -1))

    def wait(self, timeout_s: float, busy: frozenset[str] = frozenset()) -> list[tuple[str, object]]:
        """Replies that arrived within `timeout_s`; `busy` names the workers in use (they may be on the CPU)."""
        events = {}
        waited_from = time.perf_counter()
        if self.spinner.spin_s and not busy & self.shares_core_with:
            def arrived() -> bool:
                nonlocal events
                events = dict(self.poller.poll(0))
                return bool(events)

            self.spinner.spin(arrived, limit_s=timeout_s)
        if not events:
            events = dict(self.poller.poll(timeout_s * 1000))
        if not events and self.health_check is not None:
            self.health_check()
        began = time.perf_counter()
        self.spans.add("wait", waited_from, began)
        replies = self._receive(socket for socket in events if socket in self._role_of)
        if not replies and any(alarm in events for alarm in self._alarms):
            replies = self._on_alarm(exited=any(fd in events for fd in self._sentinels))
        return replies

    def _receive(self, sockets) -> list[tuple[str, object]]:
        replies = []
        for socket in sockets:
            role = self._role_of[socket]
            while True:
                began = time.perf_counter()
                try:
                    payload = socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    reply = decode(payload)
                except ProtocolError as error:
                    self.lost.add(role)
                    raise WorkerFailed(f"[{role}] {self.who(role)} sent a malformed message: {error}") from None
                if self._outstanding[role]:
                    self._outstanding[role].pop(0)
                replies.append((role, reply))
                self.spans.add(f"recv {role}", began, time.perf_counter(), getattr(reply, "seq_id", -1))
        return replies

    def _on_alarm(self, exited: bool) -> list[tuple[str, object]]:
        """A worker process exited or a connection was lost or refused: its last messages (a fatal
        ErrorReply says more than any exit code) if any, else WorkerFailed naming it."""
        problems = {role: problem for role, watch in self.watches.items() if (problem := watch.problem())}
        if not problems and not exited:
            return []  # a connection came up
        deadline = time.monotonic() + LAST_WORDS_S
        while time.monotonic() < deadline:
            ready = dict(self._replies_poller.poll(max(1, (deadline - time.monotonic()) * 1000)))
            replies = self._receive(socket for socket in ready if socket in self._role_of)
            if replies:
                return replies
        if self.health_check is not None:
            self.health_check()  # raises for a worker process that has exited
        for role, problem in problems.items():
            self.lost.add(role)
            if problem == "lost":
                raise WorkerFailed(f"[{role}] {self.who(role)} stopped answering: {self.heartbeats.describe()} "
                                   f"{self.activity(role)}")
            raise WorkerFailed(f"[{role}] {self.who(role)} {problem} (check the CURVE keys: the worker must "
                               "list the coordinator's public key, and the coordinator must hold the worker's)")
        return []

    def who(self, role: str) -> str:
        """'the target worker (pid 12, model 'target' at ipc://...)', for error messages."""
        ready = self.ready.get(role)
        if ready is None:
            return f"the {role} worker at {self.addresses[role]}"
        return f"the {role} worker (pid {ready.pid}, model {ready.model!r} at {self.addresses[role]})"

    def activity(self, role: str) -> str:
        outstanding = self._outstanding[role]
        return describe_activity(outstanding[0] if outstanding else None)

    def handshake(self, timeout_s: float) -> dict[str, Ready]:
        """Sends Hello to every worker and waits for their Ready (a load error comes back as ErrorReply)."""
        for role in self.sockets:
            self.submit(role, Hello(os.getpid()))
        ready: dict[str, Ready] = {}
        deadline = time.monotonic() + timeout_s
        while len(ready) < len(self.sockets):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(self.sockets) - set(ready))
                raise TimeoutError(
                    f"{' and '.join(missing)} worker(s) not ready after {timeout_s:.0f} s (raise --ready-timeout)"
                )
            for role, reply in self.wait(min(left, 0.25), busy=frozenset(self.sockets)):  # loading: no spinning
                if isinstance(reply, ErrorReply):
                    raise RuntimeError(f"[{role}] {reply.message}")
                if not isinstance(reply, Ready):
                    raise ProtocolError(f"[{role}] answered Hello with {type(reply).__name__}")
                ready[role] = reply
        self.ready = ready
        return ready

    def close(self) -> None:
        for watch in self.watches.values():
            watch.close()
        for socket in self.sockets.values():
            socket.close(0)
        self.context.term()
