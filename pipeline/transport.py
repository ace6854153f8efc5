"""The coordinator's end of the sockets: one DEALER per worker, replies gathered with one poller."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import zmq

from pipeline.protocol import MAX_MESSAGE_BYTES, ErrorReply, Hello, ProtocolError, Ready, decode, encode


class ZmqTransport:
    def __init__(
        self, addresses: dict[str, str], health_check: Callable[[], None] | None = None, spin_s: float = 0.0
    ) -> None:
        self.context = zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}
        self.poller = zmq.Poller()
        self.health_check = health_check
        self.spin_s = spin_s  # busy-poll this long before blocking (only where the core is ours alone)
        self.bytes_sent = self.bytes_received = 0
        self.wire_s = 0.0  # time spent encoding, decoding, sending and receiving
        for role, address in addresses.items():
            socket = self.context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            socket.connect(address)
            self.sockets[role] = socket
            self.poller.register(socket, zmq.POLLIN)
        self._role_of = {socket: role for role, socket in self.sockets.items()}

    def submit(self, role: str, message: object) -> None:
        began = time.perf_counter()
        payload = encode(message)
        self.sockets[role].send(payload)
        self.bytes_sent += len(payload)
        self.wire_s += time.perf_counter() - began

    def wait(self, timeout_s: float) -> list[tuple[str, object]]:
        events = {}
        if self.spin_s:
            deadline = time.perf_counter() + min(self.spin_s, timeout_s)
            while not events and time.perf_counter() < deadline:
                events = dict(self.poller.poll(0))
        if not events:
            events = dict(self.poller.poll(timeout_s * 1000))
        if not events and self.health_check is not None:
            self.health_check()
        began = time.perf_counter()
        replies = []
        for socket in events:
            while True:
                try:
                    payload = socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.bytes_received += len(payload)
                replies.append((self._role_of[socket], decode(payload)))
        self.wire_s += time.perf_counter() - began
        return replies

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
            for role, reply in self.wait(min(left, 0.25)):
                if isinstance(reply, ErrorReply):
                    raise RuntimeError(f"[{role}] {reply.message}")
                if not isinstance(reply, Ready):
                    raise ProtocolError(f"[{role}] answered Hello with {type(reply).__name__}")
                ready[role] = reply
        return ready

    def close(self) -> None:
        for socket in self.sockets.values():
            socket.close(0)
        self.context.term()
