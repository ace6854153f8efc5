"""Logs what happens to a worker's connections, from libzmq's socket monitor, in a thread of its own.

libzmq handles some bad input below the protocol: a message over MAXMSGSIZE closes the connection,
a CURVE client whose key is not authorized fails its handshake. Neither reaches the worker's loop;
this thread says so in the log. It owns the monitor socket: no socket is shared between threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

_EVENTS = {
    zmq.EVENT_ACCEPTED: "a coordinator connected",
    zmq.EVENT_DISCONNECTED: "a connection closed (the coordinator left, or sent a message over the size limit)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused a client: its CURVE key is not among --curve-clients",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "refused a client that failed the handshake (no or wrong CURVE keys?)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "refused a client that failed the handshake",
}


QUIET_S = 10.0  # a line repeated within this long is counted, not repeated


class RepeatFilter:
    """Passes a line on, then counts its repeats for QUIET_S before saying it again with the count:
    a client retrying with a wrong CURVE key every 100 ms must not flood the log."""

    def __init__(self, log: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.clock = clock
        self.last = ""
        self.last_at = float("-inf")
        self.held = 0  # repeats of `last` not yet reported

    def __call__(self, text: str) -> None:
        now = self.clock()
        if text != self.last:
            self.flush()
            self.log(text)
        elif now - self.last_at < QUIET_S:
            self.held += 1
            return
        else:
            self.log(f"{text} ({self.held + 1} times in the last {now - self.last_at:.0f} s)")
            self.held = 0
        self.last, self.last_at = text, now

    def flush(self) -> None:
        """Reports the repeats held back, if any (called when the events stop)."""
        if self.held:
            self.log(f"{self.last} ({self.held} more time(s) after that)")
            self.held = 0


def log_connection_events(socket: zmq.Socket, log: Callable[[str], None]) -> None:
    """Starts a daemon thread that logs `socket`'s connection events until the socket is closed."""
    mask = 0
    for event in _EVENTS:
        mask |= event
    monitor = socket.get_monitor_socket(mask)
    filtered = RepeatFilter(log)

    def run() -> None:
        try:
            while True:
                if not monitor.poll(QUIET_S * 1000):
                    filtered.flush()
                    continue
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    break
                filtered(_EVENTS.get(event["event"], f"socket event {event['event']}"))
        except zmq.ZMQError:  # the context is terminating
            pass
        finally:
            filtered.flush()
            monitor.close(0)

    threading.Thread(target=run, name="connection-log", daemon=True).start()
