"""`specpipe serve` as users run it: a process of its own with its two workers, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from pipeline.config import PromptsConfig
from pipeline.serving.config import BenchServeConfig, LoadConfig
from pipeline.serving.load import run_load
from tests.pipeline.processes import survivors, worker_pids
from tests.pipeline.serving.servers import MODEL, ServeProcess, start_serve
from workers.bundled import HELDOUT_PROMPTS

pytestmark = pytest.mark.slow

PROMPTS = [json.loads(line)[:160] for line in HELDOUT_PROMPTS.read_text().splitlines()[:3]]
SETTINGS = ["--mode", "overlap", "--k", "3", "--max-new-tokens", "32"]  # what launch and serve share
HTTP_SETTINGS = ["--client-timeout", "20", "--keep-alive-timeout", "5", "--max-connections", "64"]


def client_of(server: ServeProcess, timeout_s: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=timeout_s)


def health(server: ServeProcess) -> int | None:
    """GET /health's status; None if nothing listens."""
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError):
        return None


def stop(server: ServeProcess, workers: dict[str, int]) -> int:
    """SIGTERM, then its exit status; checks that no worker outlives it."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(30)
    assert survivors(workers.values()) == []
    return code


def resident(pid: int) -> tuple[int, int]:
    """(resident memory in kB, open file descriptors) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def server():
    served = start_serve(*SETTINGS, *HTTP_SETTINGS)
    workers = worker_pids(served.process.pid)
    yield served
    assert stop(served, workers) == 0


def test_greedy_output_is_token_identical_to_launch(server):
    launched = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "launch", *SETTINGS, "--json",
                               *[arg for prompt in PROMPTS for arg in ("--prompt", prompt)]],
                              capture_output=True, text=True, timeout=300, check=True)
    records = [json.loads(line) for line in launched.stdout.splitlines()]
    client = client_of(server)
    for prompt, record in zip(PROMPTS, records, strict=True):
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                           extra_body={"return_token_ids": True})
        assert answer.choices[0].model_extra["token_ids"] == record["token_ids"]
        assert answer.choices[0].text == record["text"]
        assert answer.usage.completion_tokens == record["new_tokens"]


def test_a_thousand_requests_leave_memory_and_descriptors_flat(server):
    """A soak through bench-serve's own load generator: bounded (1,000 short requests), loopback only."""
    def load(requests: int):
        # Short prompts and two tokens each: the soak is about a thousand requests' lifecycles, not decoding.
        config = BenchServeConfig(LoadConfig(url=server.url, num_requests=requests, concurrency=16,
                                             max_new_tokens=2, duration_s=240),
                                  PromptsConfig(texts=tuple(prompt[:24] for prompt in PROMPTS)))
        return asyncio.run(run_load(config))

    pid = server.process.pid
    warm = load(100)  # allocators and caches reach their working size
    assert warm.completed == 100
    rss_before, fds_before = resident(pid)
    soak = load(1000)
    rss_after, fds_after = resident(pid)
    assert (soak.completed, soak.failed) == (1000, 0)
    assert fds_after <= fds_before + 4, (fds_before, fds_after)
    assert rss_after - rss_before < 24 * 1024, f"resident memory grew from {rss_before} kB to {rss_after} kB"


def test_sigterm_drains_what_runs_and_leaves_no_process():
    served = start_serve("--mode", "overlap", "--max-new-tokens", "64", "--drain-timeout", "20")
    workers = worker_pids(served.process.pid)
    client = client_of(served)
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=160, temperature=0, stream=True)
    chunks = iter(stream)
    received = [next(chunks)]
    served.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while health(served) not in (503, None):  # draining: no new work
        assert time.monotonic() < deadline
        time.sleep(0.05)
    received += list(chunks)
    assert received[-1].choices[0].finish_reason == "length"  # the request in flight finished
    assert len(received) >= 2
    assert served.process.wait(30) == 0
    assert survivors(workers.values()) == []
    served.read_log(1)
    assert any("draining" in line for line in served.log)


def test_a_dead_worker_ends_its_requests_with_an_error_and_the_server_within_5_s():
    served = start_serve("--mode", "overlap", "--max-new-tokens", "64")
    workers = worker_pids(served.process.pid)
    client = client_of(served)
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=200, temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)
    statuses: list[int | None] = []
    os.kill(workers["target"], signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(openai.APIError, match="target"):
        for _ in chunks:
            pass
    statuses.append(health(served))
    code = served.process.wait(10)
    took = time.monotonic() - killed
    assert statuses[0] in (503, None)  # unhealthy, or gone already
    assert code == 1 and took < 5.0, (code, took)
    assert survivors(workers.values()) == []
    served.read_log(1)
    assert any("target" in line and "exiting" in line for line in served.log), served.log


def test_a_taken_port_fails_before_any_worker_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "serve", "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--port" in result.stderr and "[draft]" not in result.stderr
    assert time.monotonic() - began < 30


def test_a_key_from_a_file_is_required_and_never_on_the_command_line(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    served = start_serve("--mode", "target-only", "--max-new-tokens", "4", "--api-key-file", str(key_file))
    workers = worker_pids(served.process.pid)
    try:
        assert "file-key" not in " ".join(served.process.args)
        with pytest.raises(openai.AuthenticationError):
            client_of(served).completions.create(model="target", prompt="def f():", max_tokens=2)
        keyed = openai.OpenAI(base_url=served.url + "/v1", api_key="file-key", max_retries=0, timeout=60)
        assert keyed.completions.create(model="target", prompt="def f():", max_tokens=2).usage.completion_tokens == 2
    finally:
        assert stop(served, workers) == 0
