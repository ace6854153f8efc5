"""`specpipe serve`: the checks and workers of `launch`, then the engine on a thread and the API on uvicorn.

Lifecycle: everything that can be checked is, and the port is bound, before any worker starts. SIGTERM or
Ctrl-C drains: the listening socket closes, /health turns 503, requests in flight get --drain-timeout
seconds to finish and are cancelled after it, then the workers stop. If a worker dies, its requests end
with an error (an error event on a stream), /health turns 503, and the server exits with status 1 within
a few seconds, leaving a supervisor (systemd, Kubernetes) to restart it: a restarted worker would have
lost every KV cache, and restarting in place would hide a crash loop.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
import threading
from dataclasses import replace
from types import FrameType

import uvicorn

from pipeline.runtime.cancellation import interrupt_on_sigterm
from pipeline.runtime.cluster import LocalCluster, cluster_config, log
from pipeline.runtime.preflight import check_checkpoints, check_settings, check_workers
from pipeline.runtime.remote_workers import check_remote_workers
from pipeline.serving.app import ServerState, build_app
from pipeline.serving.config import HttpConfig, ServeConfig
from pipeline.serving.connections import uvicorn_config
from pipeline.serving.engine_loop import EngineLoop
from pipeline.serving.metrics import ServingMetrics
from pipeline.serving.requests import Requests
from workers.model.checkpoint import load_tokenizer

FAILURE_GRACE_S = 0.5  # after a worker died: time for the error events to reach their clients


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the API when it starts draining and saying where it listens."""

    def __init__(self, config: uvicorn.Config, state: ServerState, banner: str) -> None:
        super().__init__(config)
        self.state, self.banner = state, banner

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.state.draining:
            self.state.draining = True
            log(f"draining: no new requests; those in flight have {self.config.timeout_graceful_shutdown:g} s "
                "(--drain-timeout)")
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            log(f"{self.banner} on http://{shown}:{port}/v1 (GET /health, /metrics)")


def listening_socket(http: HttpConfig) -> socket.socket:
    """The server's socket, bound now, so that a taken port fails before any worker starts."""
    host = "127.0.0.1" if http.host == "localhost" else http.host
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, http.port))
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {http.host} port {http.port}: {error.strerror}; pick another --port "
                         "(or --host)") from None
    sock.set_inheritable(True)
    return sock


def run_serve(config: ServeConfig) -> int:
    """Serves until SIGTERM or Ctrl-C (status 0) or a worker failure (status 1).

    Bad input raises ValueError (or SpecpipeError, TimeoutError) before any process starts."""
    decode, models, http = config.decode, config.models, config.http
    http.validate()
    key = http.key()
    http = replace(http, api_key=key, api_key_file=None)  # the app checks requests against api_key alone
    config = replace(config, http=http)
    warning = http.exposure_warning(key)
    if warning is not None:
        log(warning)
    check_workers(config.workers)
    context = check_checkpoints(models, decode.uses_draft)
    check_settings(decode, context, decode.max_seqs)
    config.liveness.heartbeats.validate()
    tokenizer = load_tokenizer(models.target_dir)
    sock = listening_socket(http)
    workers = cluster_config(models, config.workers, decode.mode, decode.max_seqs, config.liveness, config.remote)
    interrupt_on_sigterm()  # while starting: stop the workers on the way out, like Ctrl-C
    try:
        with LocalCluster(workers) as cluster:
            check_remote_workers(cluster.ready, cluster.remote, str(models.target_dir), decode.max_seqs)
            return serve_on(cluster, config, tokenizer, sock)
    except KeyboardInterrupt:
        print("specpipe: interrupted; workers stopped", file=sys.stderr, flush=True)
        return 130
    finally:
        sock.close()


def serve_on(cluster: LocalCluster, config: ServeConfig, tokenizer: object, sock: socket.socket) -> int:
    decode, http = config.decode, config.http
    model_name = http.served_model_name or config.models.target_dir.name
    metrics = ServingMetrics(model_name, decode.k if decode.uses_draft else 0)
    limits = cluster.limits()
    server: DrainingServer | None = None

    def on_failure(message: str) -> None:  # from the engine thread
        def stop() -> None:
            if server is not None:
                server.should_exit = True

        threading.Timer(FAILURE_GRACE_S, stop).start()

    engine = EngineLoop(cluster.transport, limits, decode, metrics, log, on_failure)
    requests = Requests(engine, tokenizer, limits, decode, metrics, str(config.models.target_dir))
    state = ServerState(requests, http, model_name, decode.max_seqs + http.max_waiting, metrics)
    banner = f"serving {model_name!r} ({decode.mode}, k={decode.k}, up to {decode.max_seqs} sequences at once)"
    server = DrainingServer(uvicorn_config(build_app(state, log), http), state, banner)
    # uvicorn handles SIGTERM and SIGINT while it runs (a first one drains, a second one forces) and raises
    # them again once it has stopped: by then they have been served, and the shutdown below goes on
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    if engine.failure is not None:
        log(f"exiting: {engine.failure}")
        return 1
    log("stopped: every request finished or cancelled, the workers' KV slots freed")
    return 0
