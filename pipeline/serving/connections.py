"""How `specpipe serve` holds its HTTP connections: uvicorn, with every way a client can hold a slot bounded.

uvicorn times out a connection only between two requests (its keep-alive timer starts once a response
is done); a client that connects and sends nothing, or half a request line, would hold its descriptor
forever. The protocol below arms the same timer from the moment a connection opens and re-arms it on
every byte until a request's headers are complete.

It also bounds what a client that stops reading can leave buffered: Linux grows a loopback socket's send
buffer to megabytes, and asyncio buffers 64 KiB more before it tells uvicorn to wait, so a whole stream
of a thousand tokens would be "sent" to a client that reads none of it, and nothing would notice. With
the buffers below, such a client makes uvicorn's send wait within a hundred tokens or so, and the app
(pipeline.serving.app.UnreadResponses) ends the response after --client-timeout. The connection limit is
uvicorn's `limit_concurrency` (503 past it).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.serving.app import ABORT_CONNECTION
from pipeline.serving.config import HttpConfig

# A stream's chunk is ~200 bytes a token, so these hold a hundred tokens or so: seconds of output, and far
# more than a reading client ever lets pile up
SEND_BUFFER_BYTES = 8 << 10  # a connection's kernel send buffer (Linux doubles it)
WRITE_BUFFER_BYTES = 4 << 10  # asyncio's buffer above it, past which uvicorn's send waits for the client

UVICORN_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"coord": {"format": "[coord] %(message)s"}},
    "filters": {"timed_out": {"()": "pipeline.serving.connections.TimedOutResponses"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "coord", "stream": "ext://sys.stderr",
                            "filters": ["timed_out"]}},
    "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False}},
}


class TimedOutResponses(logging.Filter):
    """Drops uvicorn's error line for a response the app abandoned on purpose: UnreadResponses logs why."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing response."


class BoundedConnection(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with small send buffers, closing a connection whose request has not begun
    within the keep-alive timeout: from when it opens, and from each byte received until its headers are
    complete."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)
        super().connection_made(transport)
        self._restart_timer()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request began (its app runs from the next turn of the loop)
            self.cycle.scope[ABORT_CONNECTION] = self.transport.abort  # type: ignore[literal-required]
        if self._between_requests():
            self._restart_timer()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _restart_timer(self) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self._between_requests() and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: ASGIApp, http: HttpConfig, host: str | None = None, port: int | None = None) -> uvicorn.Config:
    """The server's uvicorn settings (`host` and `port` for a server that binds its own socket)."""
    kwargs = {} if host is None else {"host": host, "port": port}
    return uvicorn.Config(app, http=BoundedConnection, log_config=UVICORN_LOGGING, access_log=False,
                          lifespan="off", timeout_graceful_shutdown=http.drain_timeout_s,
                          timeout_keep_alive=http.keep_alive_timeout_s, limit_concurrency=http.max_connections,
                          **kwargs)
