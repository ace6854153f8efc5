"""Noticing that a worker died or hung, and saying so in words a user can act on.

Two signals, both independent of what the worker's Python code is doing:
  * a process sentinel (a pidfd) for a worker this coordinator spawned: readable the instant the
    process exits, whatever killed it;
  * ZeroMQ's own heartbeats (ZMTP PING/PONG) on every connection. The worker's libzmq I/O thread
    answers them without the GIL, so a long forward pass never starves them; a stopped or frozen
    host does not answer, and after the timeout libzmq drops the connection, which the socket
    monitor reports here.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from workers.protocol.messages import DraftRequest, Hello, Ping, Release, SpeculateRequest, VerifyRequest

DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
DEFAULT_HEARTBEAT_TIMEOUT_S = 2.0

_HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused our key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed the security handshake",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed the security handshake",
}


@dataclass(frozen=True)
class Heartbeats:
    interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S

    def validate(self) -> None:
        if not 0 < self.interval_s < self.timeout_s:
            raise ValueError(
                f"--heartbeat-interval ({self.interval_s} s) must be positive and shorter than "
                f"--heartbeat-timeout ({self.timeout_s} s)"
            )

    def arm(self, socket: zmq.Socket) -> None:
        """Makes libzmq ping the peer every interval and drop the connection after timeout of silence."""
        socket.setsockopt(zmq.HEARTBEAT_IVL, max(1, round(self.interval_s * 1000)))
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, round(self.timeout_s * 1000)))

    def describe(self) -> str:
        return (f"no heartbeat for {self.timeout_s:g} s (--heartbeat-timeout; pinged every {self.interval_s:g} s, "
                "--heartbeat-interval)")


class ConnectionWatch:
    """Reads one socket's monitor events; says when an established connection was lost or refused."""

    def __init__(self, socket: zmq.Socket) -> None:
        self.monitor = socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        self._socket = socket
        self.connected = False

    def problem(self) -> str | None:
        """Drains pending events; a description of the first problem among them, else None."""
        problem = None
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                problem = problem or "lost"
            elif event in _HANDSHAKE_FAILED:
                problem = problem or _HANDSHAKE_FAILED[event]
        return problem

    def close(self) -> None:
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)


def process_sentinel(pid: int) -> int | None:
    """A file descriptor that becomes readable when process `pid` exits (None where pidfds are missing)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def describe_activity(message: object | None) -> str:
    """What a worker was doing, given the last request it was sent and has not answered."""
    if message is None:
        return "while idle (no request outstanding)"
    if isinstance(message, VerifyRequest):
        return (f"while verifying request {message.request_id} (sequence {message.seq_id}: {len(message.feed)} "
                f"tokens at position {message.start}, {message.drafted} drafted)")
    if isinstance(message, DraftRequest):
        return (f"while drafting request {message.request_id} (sequence {message.seq_id}: reading "
                f"{len(message.feed)} tokens at position {message.start}, proposing {message.count})")
    if isinstance(message, SpeculateRequest):
        return (f"while drafting ahead, request {message.request_id} (sequence {message.seq_id}: "
                f"{len(message.heads) + message.bonus_guesses} branches of {message.count} tokens)")
    if isinstance(message, Hello):
        return "while loading its model (before READY)"
    if isinstance(message, Release):
        return f"while releasing sequence {message.seq_id}"
    if isinstance(message, Ping):
        return "while answering a ping"
    return f"while handling {type(message).__name__}"
