"""Logs what happens to a worker's connections, from libzmq's socket monitor, in a thread of its own.

libzmq handles some bad input below the protocol: a message over MAXMSGSIZE closes the connection,
a CURVE client whose key is not authorized fails its handshake. Neither reaches the worker's loop;
this thread says so in the log. It owns the monitor socket: no socket is shared between threads.
"""

from __future__ import annotations

import threading
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


def log_connection_events(socket: zmq.Socket, log: Callable[[str], None]) -> None:
    """Starts a daemon thread that logs `socket`'s connection events until the socket is closed."""
    mask = 0
    for event in _EVENTS:
        mask |= event
    monitor = socket.get_monitor_socket(mask)

    def run() -> None:
        try:
            while True:
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    break
                log(_EVENTS.get(event["event"], f"socket event {event['event']}"))
        except zmq.ZMQError:  # the context is terminating
            pass
        finally:
            monitor.close(0)

    threading.Thread(target=run, name="connection-log", daemon=True).start()
