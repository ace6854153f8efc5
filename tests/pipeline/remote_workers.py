"""Helpers for tests that start `specpipe worker` processes by hand, as on another host, with CURVE keys."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from workers.curve import keygen


def make_keys(directory: Path, *names: str) -> Path:
    """Writes a key pair per name into `directory` (as `specpipe keygen` does); returns the directory."""
    for name in names:
        keygen(directory, name)
    return directory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_worker(role: str, checkpoint: Path, bind: str, keys: Path, clients: str, log: Path,
                 prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`specpipe worker` with ROLE.key_secret from `keys`, admitting the clients in `clients`; stderr to `log`.
    `prefix` runs it under another command (e.g. `ip netns exec NS`)."""
    command = [*prefix, sys.executable, "-m", "pipeline.cli.main", "worker", "--role", role, "--checkpoint",
               str(checkpoint), "--bind", bind, "--dtype", "float32", "--max-seq-len", "256", "--slots", "2",
               "--curve-secret-key", str(keys / f"{role}.key_secret"), "--curve-clients", clients]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def launch_json(*args: str, timeout: float = 180) -> tuple[dict, str]:
    """`specpipe launch --json ARGS` with float32 weights (as the workers above): its one result and its stderr."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "launch", "--dtype", "float32", "--json", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
