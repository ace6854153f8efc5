"""`specpipe serve` for the tests: in this process (both models in-process, uvicorn on a thread), or as the
real command in a process of its own."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn

from pipeline.algorithm.generation import ModelLimits
from pipeline.config import DecodeConfig
from pipeline.runtime.in_process import LocalTransport
from pipeline.serving.app import ServerState, build_app
from pipeline.serving.config import HttpConfig
from pipeline.serving.connections import uvicorn_config
from pipeline.serving.engine_loop import EngineLoop
from pipeline.serving.metrics import ServingMetrics
from pipeline.serving.requests import Requests
from tests.pipeline.processes import FAULTS_DIR
from workers.bundled import DRAFT_DIR, TARGET_DIR
from workers.model import ModelRunner
from workers.model.checkpoint import load_tokenizer

MODEL = "target"  # the served model name: the bundled target directory's
CONTEXT = 256  # the in-process workers' KV slots
# A ChatML-like template: the bundled checkpoints have none
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass
class InProcessServer:
    url: str
    state: ServerState
    engine: EngineLoop
    tokenizer: object
    draft: ModelRunner
    target: ModelRunner


@contextmanager
def in_process_server(decode: DecodeConfig, http: HttpConfig = HttpConfig(port=0), slots: int = 16,
                      chat_template: str | None = CHAT_TEMPLATE, context: int = CONTEXT) -> Iterator[InProcessServer]:
    """The API over both models in this process (a LocalTransport): what `specpipe serve` runs, less the
    processes and sockets of the workers."""
    draft = ModelRunner.from_checkpoint(DRAFT_DIR, n_slots=slots, max_seq_len=context)
    target = ModelRunner.from_checkpoint(TARGET_DIR, n_slots=slots, max_seq_len=context)
    tokenizer = load_tokenizer(TARGET_DIR)
    tokenizer.chat_template = chat_template
    limits = ModelLimits(target.config.vocab_size, frozenset(target.config.eos_token_ids), context)
    metrics = ServingMetrics(MODEL, decode.k)
    engine = EngineLoop(LocalTransport(draft if decode.uses_draft else None, target), limits, decode, metrics,
                        log=lambda line: print(f"[coord] {line}", file=sys.stderr))
    requests = Requests(engine, tokenizer, limits, decode, metrics, str(TARGET_DIR))
    state = ServerState(requests, http, MODEL, decode.max_seqs + http.max_waiting, metrics)
    with uvicorn_thread(state) as url:
        engine.start()
        try:
            yield InProcessServer(url, state, engine, tokenizer, draft, target)
        finally:
            engine.stop()


@contextmanager
def uvicorn_thread(state: ServerState) -> Iterator[str]:
    server = uvicorn.Server(uvicorn_config(build_app(state, log=lambda line: print(f"[coord] {line}", file=sys.stderr)),
                                           state.http, host="127.0.0.1", port=state.http.port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class ServeProcess:
    process: subprocess.Popen
    url: str
    log: list[str]  # its stderr lines so far

    def read_log(self, timeout_s: float = 0.0) -> None:
        """Takes what it wrote to stderr within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = select.select([self.process.stderr], [], [], max(0.0, deadline - time.monotonic()))[0]
            if not ready:
                return
            line = self.process.stderr.readline()
            if not line:
                return
            self.log.append(line.decode(errors="replace"))


def start_serve(*args: str, fault: str | None = None, timeout_s: float = 120.0) -> ServeProcess:
    """`specpipe serve --port 0 ARGS` in a process of its own; returns once it listens."""
    env = dict(os.environ)
    if fault is not None:
        env["SPECPIPE_TEST_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS_DIR), env.get("PYTHONPATH")]))
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "serve", "--port", "0", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    served = ServeProcess(process, "", [])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        served.read_log(0.1)
        for line in served.log:
            found = re.search(r" on (http://\S+)/v1 ", line)
            if found:
                served.url = found.group(1)
                return served
        if process.poll() is not None:
            served.read_log(0.5)
            raise AssertionError(f"serve exited with {process.returncode}: {''.join(served.log)}")
    process.kill()
    raise AssertionError(f"serve did not listen within {timeout_s} s: {''.join(served.log)}")
