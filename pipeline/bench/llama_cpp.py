"""llama.cpp as a bench peer: its own server on the same checkpoints (converted to GGUF f16), the same prompts.

`scripts/build_llama_cpp.py` builds llama.cpp once (from the source inside llama-cpp-python's sdist) into
the cache directory and converts the draft and target there; `specpipe bench --peers llama.cpp` finds them
by the checkpoints' contents. Each llama.cpp configuration is one `llama-server` process, started once
and pinned to the cores our workers use, with as many threads for each model as our configuration uses cores
(its speculative decoding drafts, then verifies, so each model may use them all in turn):

  llama.cpp target-only   the target alone
  llama.cpp spec k=K      llama.cpp's speculative decoding with the draft (`--spec-type draft-simple`,
                          `--spec-draft-n-max K`, its other settings its defaults), serial: draft, then verify
  ... p-min=0.75          the same, drafting stopped once the draft's top token is below 0.75 (its
                          `--spec-draft-p-min`; the default in this build is 0): each engine at its best

Prompts go in as token ids (the server adds no BOS to them), so both engines read exactly the same
tokens; the server streams each step's tokens (`return_tokens`), which give the token ids for the
identity check and, by their arrival, the same TTFT and inter-token times ours are measured with: wall
clock in the bench process, from the request to the last token. The server's own timings and its
drafted/accepted counts come with the last event. The prompt cache is off (`cache_prompt: false`): every
request prefills its whole prompt, as ours do.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.bench.records import Generation, Round
from workers.backends.cpu_native import cache_dir

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp is built (llama.cpp 0c1e570)
BUILD_COMMAND = "python scripts/build_llama_cpp.py"
SERVER_START_TIMEOUT_S = 60.0


def default_root() -> Path:
    return cache_dir() / "llama.cpp"


def fingerprint(checkpoint: Path) -> str:
    """A checkpoint's identity by content (config, tokenizer, weights): a GGUF is found again for the same model
    wherever its directory lies, and not for a retrained one."""
    digest = hashlib.sha256()
    files = [checkpoint / "config.json", checkpoint / "tokenizer.json", *sorted(checkpoint.glob("*.safetensors"))]
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class LlamaCppBuild:
    """Where the build script put llama.cpp's binaries and GGUF files."""

    root: Path

    @property
    def bin_dir(self) -> Path:
        return self.root / "build" / "bin"

    @property
    def server(self) -> Path:
        return self.bin_dir / "llama-server"

    @property
    def bench_tool(self) -> Path:
        return self.bin_dir / "llama-bench"

    def version(self) -> str:
        """What the server says it is, e.g. "llama.cpp 0.5.0-dev (build 1, commit 0c1e570)"."""
        done = subprocess.run([str(self.server), "--version"], capture_output=True, text=True)
        lines = (done.stdout + done.stderr).splitlines()
        found = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("version:")), "?")
        return f"llama.cpp {found}"

    def gguf(self, checkpoint: Path) -> Path:
        checkpoint = Path(checkpoint).resolve()
        return self.root / "gguf" / f"{checkpoint.name}-{fingerprint(checkpoint)}.f16.gguf"

    def missing(self, checkpoints: Iterable[Path]) -> str:
        """'' when the server and a GGUF of every checkpoint are here, else what is not and how to make it."""
        if not self.server.exists():
            return f"no llama.cpp build at {self.root} (make it with: {BUILD_COMMAND}; about 3-9 minutes on 2 cores)"
        absent = [str(path) for path in checkpoints if not self.gguf(path).exists()]
        if absent:
            return (f"no GGUF of {', '.join(absent)} under {self.root / 'gguf'} (make them with: {BUILD_COMMAND} "
                    f"--target DIR --draft DIR)")
        return ""


# --- the server's stream ---------------------------------------------------------------------------


@dataclass
class Completion:
    """What one streamed completion of llama-server gave."""

    token_ids: list[int]
    token_times: list[float]  # seconds from the request to each token's arrival (a step's tokens arrive together)
    stop_type: str = ""  # "eos", "limit", "word", ...
    timings: dict = field(default_factory=dict)  # the server's own: prompt_ms, predicted_ms, draft_n, ...


def parse_stream(events: Iterable[tuple[float, str]]) -> Completion:
    """llama-server's server-sent events (`data: {...}` lines, each with when it arrived) as one Completion.
    Lines that are not data (blank separators, comments) are skipped; an error event raises RuntimeError."""
    completion = Completion([], [])
    for arrived, line in events:
        line = line.strip()
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            break
        event = json.loads(payload)
        if "error" in event:
            error = event["error"]
            raise RuntimeError(f"llama-server: {error.get('message', error) if isinstance(error, dict) else error}")
        tokens = event.get("tokens") or []
        completion.token_ids += tokens
        completion.token_times += [arrived] * len(tokens)
        if event.get("stop"):
            completion.stop_type = event.get("stop_type", "")
            completion.timings = event.get("timings") or {}
    return completion


# --- the server process ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# A --spec-draft-p-min that bench runs beside the server's default (0 in this build), so that llama.cpp's best
# setting is among those measured.
SWEPT_DRAFT_P_MIN = 0.75


@dataclass(frozen=True)
class ServerConfig:
    """One llama.cpp configuration: the target alone, or with the draft at draft max k."""

    target_gguf: Path
    draft_gguf: Path | None = None
    draft_max: int | None = None
    threads: int = 1  # for each model: every core our configuration uses (llama.cpp drafts, then verifies)
    cores: tuple[int, ...] = ()  # pinned here (all its threads), as our workers are; () = anywhere
    draft_p_min: float | None = None  # --spec-draft-p-min; None: the server's default
    context: int = 1024

    def command(self, server: Path, port: int) -> list[str]:
        threads = str(self.threads)
        command = [str(server), "-m", str(self.target_gguf), "-t", threads, "-tb", threads, "-np", "1",
                   "-c", str(self.context), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        if self.draft_gguf is not None:
            command += ["-md", str(self.draft_gguf), "-td", threads, "-tbd", threads, "--spec-type", "draft-simple",
                        "--spec-draft-n-max", str(self.draft_max)]
            if self.draft_p_min is not None:
                command += ["--spec-draft-p-min", str(self.draft_p_min)]
        return command


class LlamaServer:
    """A running llama-server; `complete` streams one greedy completion of a prompt given as token ids."""

    def __init__(self, build: LlamaCppBuild, config: ServerConfig, log_dir: Path | None = None) -> None:
        self.port = _free_port()
        self.config = config
        log_dir = log_dir or build.root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"llama-server-{self.port}.log"
        cores = set(config.cores)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                config.command(build.server, self.port), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with status {self.process.returncode} before it was "
                                   f"ready: {self._last_log_line()} (log: {self.log_path})")
            try:
                self._connect()
                if self._request("GET", "/health").status == 200:
                    return
            except (OSError, http.client.HTTPException):
                self.connection.close()
            time.sleep(0.05)
        raise RuntimeError(f"llama-server was not ready in {SERVER_START_TIMEOUT_S:.0f} s (log: {self.log_path})")

    def _last_log_line(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "?"
        return lines[-1].strip() if lines else "no output"

    def _connect(self) -> None:
        # a connection of its own per request: the server drops idle ones after a few seconds
        self.connection.close()
        self.connection.connect()

    def _request(self, method: str, path: str, body: dict | None = None) -> http.client.HTTPResponse:
        data = None if body is None else json.dumps(body).encode()
        self.connection.request(method, path, data, {"Content-Type": "application/json"} if data else {})
        response = self.connection.getresponse()
        if method == "GET":
            response.read()
        return response

    def complete(self, prompt: list[int], max_new_tokens: int) -> Completion:
        body = {"prompt": prompt, "n_predict": max_new_tokens, "temperature": 0.0, "stream": True,
                "return_tokens": True, "cache_prompt": False}
        self._connect()  # before the clock starts, as our coordinator's sockets are open before it sends
        began = time.perf_counter()
        response = self._request("POST", "/completion", body)
        if response.status != 200:
            raise RuntimeError(f"llama-server answered {response.status}: {response.read()[:200]!r}")
        events = ((time.perf_counter() - began, line.decode()) for line in iter(response.readline, b""))
        completion = parse_stream(events)
        response.read()
        return completion

    def close(self) -> None:
        self.connection.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def to_generation(completion: Completion) -> Generation:
    """Our record of a completion (the EOS it stopped at is among its tokens, as it is among ours)."""
    timings = completion.timings
    times = completion.token_times
    return Generation(token_ids=list(completion.token_ids), wall_s=times[-1] if times else 0.0, token_times=list(times),
                      drafted=int(timings.get("draft_n", 0)), accepted=int(timings.get("draft_n_accepted", 0)))


class LlamaCppRunner:
    """One llama.cpp configuration as a bench contender: a round is one prompt (concurrency 1)."""

    def __init__(self, server: LlamaServer, max_new_tokens: int) -> None:
        self.server = server
        self.max_new_tokens = max_new_tokens

    def __call__(self, prompts: list[list[int]], concurrency: int = 1, indices: list[int] | None = None) -> Round:
        if len(prompts) != 1:
            raise ValueError("the llama.cpp peer runs one prompt at a time (concurrency 1)")
        generation = to_generation(self.server.complete(prompts[0], self.max_new_tokens))
        return Round([generation], generation.wall_s, list(indices) if indices is not None else [0])
