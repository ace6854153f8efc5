"""A worker that dies, hangs or fails makes `specpipe launch` fail fast, naming it, with nothing left running."""

import os
import signal
import time

import pytest

from tests.pipeline.processes import read_some, start_launch, survivors, worker_pids

pytestmark = pytest.mark.slow

LONG = ("--prompt", "def parse(text):\n", "--max-new-tokens", "900")  # far longer than any test waits
# The README promises a failure within 5 s (a 2 s heartbeat timeout, or at once from the pidfd); this bound,
# process teardown included, also holds on a loaded 2-core machine.
FAILS_WITHIN_S = 10.0


# each signal and each role once: the two roles go through the same watch (a pidfd and the heartbeats)
@pytest.mark.parametrize("role, signum", [("draft", signal.SIGKILL), ("target", signal.SIGSTOP)],
                         ids=["SIGKILL-draft", "SIGSTOP-target"])
def test_dead_or_hung_worker_fails_the_launch_promptly(role, signum):
    launch = start_launch(*LONG)
    read_some(launch)  # generating: both workers are mid-stream
    workers = worker_pids(launch.pid)
    victim = workers[role]
    os.kill(victim, signum)
    killed_at = time.monotonic()
    _, stderr = launch.communicate(timeout=30)
    took = time.monotonic() - killed_at
    error = stderr.decode().strip().splitlines()[-1]
    try:
        assert launch.returncode == 1, stderr.decode()
        assert took < FAILS_WITHIN_S, f"took {took:.1f} s"
        assert f"[{role}]" in error and f"pid {victim}" in error and " while " in error, error
        if signum == signal.SIGKILL:
            assert "killed by SIGKILL" in error, error
        else:
            assert "stopped answering" in error and "--heartbeat-timeout" in error, error
    finally:
        assert survivors(workers.values()) == [], "a worker outlived the launch"


def test_a_long_forward_pass_does_not_starve_heartbeats():
    # the target's 6th forward pass spins for 1.5 s holding the GIL; heartbeats time out after 0.4 s
    launch = start_launch("--prompt", "x = 1\n", "--max-new-tokens", "12", "--heartbeat-interval", "0.1",
                          "--heartbeat-timeout", "0.4", fault="target:spin:6:1.5")
    stdout, stderr = launch.communicate(timeout=120)
    assert launch.returncode == 0, stderr.decode()
    assert "tokens/s" in stdout.decode()


def test_a_model_that_raises_is_reported_with_its_own_message():
    launch = start_launch(*LONG, fault="target:raise:20")
    read_some(launch)
    workers = worker_pids(launch.pid)
    _, stderr = launch.communicate(timeout=60)
    error = stderr.decode().strip().splitlines()[-1]
    assert launch.returncode == 1
    assert "[target]" in error and "RuntimeError: injected fault in the target model at forward call 20" in error
    assert survivors(workers.values()) == []
