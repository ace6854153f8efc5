"""A target worker on another network host (a network namespace joined by a veth pair), reached over CURVE."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.pipeline.remote_workers import launch_json, make_keys, start_worker, stop
from workers.bundled import TARGET_DIR

pytestmark = pytest.mark.slow

HOST_IP, WORKER_IP = "10.213.0.1", "10.213.0.2"
PROMPT = ("--prompt", "class Stack:\n", "--max-new-tokens", "24")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def namespace():
    """The name of a fresh network namespace reachable at WORKER_IP from this host's HOST_IP."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (`ip netns`)")
    name, host_if, worker_if = f"specpipe-{os.getpid()}", f"spv{os.getpid() % 10**6}h", f"spv{os.getpid() % 10**6}w"
    try:
        ip("netns", "add", name)
    except subprocess.CalledProcessError as error:
        pytest.skip(f"`ip netns add` failed: {error.stderr.strip()}")
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", worker_if)
        ip("link", "set", worker_if, "netns", name)
        ip("addr", "add", f"{HOST_IP}/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{WORKER_IP}/24", "dev", worker_if)
        ip("netns", "exec", name, "ip", "link", "set", worker_if, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, worker_if
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # takes the veth pair with it
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


def test_generation_across_a_network_namespace_matches_a_local_run(namespace, tmp_path):
    name, worker_if = namespace
    keys = make_keys(tmp_path, "coordinator", "target")
    address = f"tcp://{WORKER_IP}:5555"
    worker = start_worker("target", TARGET_DIR, address, keys, str(keys / "coordinator.key"), tmp_path / "target.log",
                          prefix=("ip", "netns", "exec", name))
    try:
        remote, stderr = launch_json(*PROMPT, "--target-addr", address,
                                     "--curve-secret-key", str(keys / "coordinator.key_secret"),
                                     "--target-server-key", str(keys / "target.key"))
        counter = f"/sys/class/net/{worker_if}/statistics/rx_bytes"
        received = int(subprocess.run(["ip", "netns", "exec", name, "cat", counter], capture_output=True, text=True,
                                      check=True).stdout)
        assert worker.poll() is None, "the launch stopped a worker it did not start"
    finally:
        stop(worker)
    local, _ = launch_json(*PROMPT)
    assert remote["token_ids"] == local["token_ids"] and len(remote["token_ids"]) == 24
    assert f"left the target worker at {address} running" in stderr
    assert received > 2000, f"only {received} bytes reached the namespace"
    assert "listening on tcp://10.213.0.2:5555 (CURVE)" in Path(tmp_path / "target.log").read_text()
