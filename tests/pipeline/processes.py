"""Helpers for tests that start `specpipe` processes and check that none of them survive."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

FAULTS_DIR = Path(__file__).parent / "faults"  # holds the test-only sitecustomize (fault injection)


def start_launch(*args: str, fault: str | None = None, new_session: bool = False) -> subprocess.Popen:
    """`specpipe launch ARGS` in the background, stdout and stderr piped (bytes)."""
    env = dict(os.environ)
    if fault is not None:
        env["SPECPIPE_TEST_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS_DIR), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "launch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=new_session)


def read_some(process: subprocess.Popen, timeout_s: float = 120.0) -> bytes:
    """Blocks until the process has written something to stdout; returns what it wrote."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 0.05)[0]:
            data = os.read(process.stdout.fileno(), 1 << 16)
            if data:
                return data
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before printing: {process.stderr.read().decode()}")
    raise AssertionError(f"nothing printed in {timeout_s} s")


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc)."""
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def worker_pids(pid: int) -> dict[str, int]:
    """role -> pid of the `specpipe worker` children of `pid`."""
    roles = {}
    for child in children(pid):
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"worker" in argv and b"--role" in argv:
            roles[argv[argv.index(b"--role") + 1].decode()] = child
    return roles


def running(pid: int) -> bool:
    """Exists and is not a zombie (a zombie has exited; only its parent has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def survivors(pids, grace_s: float = 1.0) -> list[int]:
    """Those of `pids` still running after `grace_s`; any found are killed so that no test leaks them."""
    deadline = time.monotonic() + grace_s
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left
