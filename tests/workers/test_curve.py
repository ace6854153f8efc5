"""Workers reached by address: CURVE lets in only listed clients, a launch uses running workers, and a
worker without keys stays on loopback."""

import subprocess
import sys

import pytest
import zmq

from tests.pipeline.remote_workers import free_port, launch_json, make_keys, start_worker, stop
from workers.bundled import DRAFT_DIR, TARGET_DIR
from workers.curve import ClientKeys, is_loopback, load_key_pair, load_public_key
from workers.protocol.codec import decode, encode
from workers.protocol.messages import DraftRequest, DraftResult, Hello, Ready, Release, Released

pytestmark = pytest.mark.slow

PROMPT = ("--prompt", "def add(a, b):\n", "--max-new-tokens", "24")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A target and a draft worker on tcp loopback that admit the key 'coordinator' only."""
    keys = make_keys(tmp_path_factory.mktemp("keys"), "coordinator", "intruder", "target", "draft")
    addresses = {role: f"tcp://127.0.0.1:{free_port()}" for role in ("target", "draft")}
    logs = {role: keys / f"{role}.log" for role in addresses}
    workers = [start_worker(role, checkpoint, addresses[role], keys, str(keys / "coordinator.key"), logs[role])
               for role, checkpoint in (("target", TARGET_DIR), ("draft", DRAFT_DIR))]
    try:
        with client(keys, "coordinator", "draft", addresses["draft"]) as socket:
            socket.send(encode(Hello(0)))
            assert socket.poll(120_000), logs["draft"].read_text()
        yield keys, addresses, logs, workers
    finally:
        stop(*workers)


class client:
    """A DEALER connected to a worker with the key pair `name` (None: no CURVE at all)."""

    def __init__(self, keys, name, role, address):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if name is not None:
            ClientKeys(load_key_pair(keys / f"{name}.key_secret", "test"),
                       load_public_key(keys / f"{role}.key", "test")).apply(self.socket)
        self.socket.connect(address)

    def __enter__(self):
        return self.socket

    def __exit__(self, *exc_info):
        self.socket.close(0)
        self.context.term()


def test_only_a_listed_client_key_gets_answers(cluster):
    keys, addresses, logs, workers = cluster
    for name in ("intruder", None):  # a key the worker was not given; no CURVE at all
        with client(keys, name, "draft", addresses["draft"]) as socket:
            socket.send(encode(Hello(0)))
            assert not socket.poll(2000), f"{name or 'a plain client'} got an answer"
    with client(keys, "coordinator", "draft", addresses["draft"]) as socket:
        socket.send(encode(Hello(0)))
        assert socket.poll(10_000) and isinstance(decode(socket.recv()), Ready)
        socket.send(encode(DraftRequest(1, 0, 0, [5, 6, 7], 3)))
        assert socket.poll(10_000)
        result = decode(socket.recv())
        assert isinstance(result, DraftResult) and len(result.tokens) == 3
        socket.send(encode(Release(0)))  # as a coordinator does: the worker serves one coordinator at a time
        assert socket.poll(10_000) and isinstance(decode(socket.recv()), Released)
    assert "refused a client: its CURVE key is not among --curve-clients" in logs["draft"].read_text()
    assert all(worker.poll() is None for worker in workers)


def test_launch_with_running_workers_matches_a_normal_launch(cluster):
    keys, addresses, _, workers = cluster
    remote, stderr = launch_json(*PROMPT, "--target-addr", addresses["target"], "--draft-addr", addresses["draft"],
                                 "--curve-secret-key", str(keys / "coordinator.key_secret"),
                                 "--target-server-key", str(keys / "target.key"),
                                 "--draft-server-key", str(keys / "draft.key"))
    local, _ = launch_json(*PROMPT)
    assert remote["token_ids"] == local["token_ids"] and len(remote["token_ids"]) == 24
    assert f"left the target worker at {addresses['target']} running (its KV slots freed)" in stderr
    assert all(worker.poll() is None for worker in workers), "the launch stopped a worker it did not start"


def test_launch_with_an_unlisted_key_fails_fast_naming_the_worker(cluster):
    keys, addresses, _, workers = cluster
    done = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "launch", *PROMPT, "--mode", "target-only",
                           "--target-addr", addresses["target"],
                           "--curve-secret-key", str(keys / "intruder.key_secret"),
                           "--target-server-key", str(keys / "target.key")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "[target]" in done.stderr and "refused our key" in done.stderr, done.stderr
    assert all(worker.poll() is None for worker in workers)


def test_a_worker_without_keys_refuses_to_listen_beyond_loopback():
    done = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "worker", "--role", "draft", "--checkpoint",
                           str(DRAFT_DIR), "--bind", f"tcp://0.0.0.0:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to listen on tcp://0.0.0.0" in lines[0] and "--curve-secret-key" in lines[0]


@pytest.mark.parametrize("address, local", [
    ("ipc:///tmp/w.sock", True), ("tcp://127.0.0.1:5555", True), ("tcp://127.9.9.9:5555", True),
    ("tcp://[::1]:5555", True), ("tcp://localhost:5555", True), ("tcp://*:5555", False),
    ("tcp://0.0.0.0:5555", False), ("tcp://10.213.0.2:5555", False), ("tcp://eth0:5555", False),
    ("tcp://example.org:5555", False), ("udp://127.0.0.1:5555", False),
])
def test_loopback_rule(address, local):
    assert is_loopback(address) == local
