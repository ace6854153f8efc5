"""Test-only fault injection for worker processes, loaded through PYTHONPATH by tests that want it.

SPECPIPE_TEST_FAULT="ROLE:KIND:AFTER[:SECONDS]" makes the ROLE worker's model misbehave on its
forward pass number AFTER (counting from 1; every pass, batched or not, goes through forward_batch):
  raise  raises RuntimeError("injected fault ..."), as a broken model or device would;
  spin   holds the GIL in a busy loop for SECONDS first, as a long forward pass would;
  load   (AFTER ignored) raises RuntimeError as the worker starts, before it loads anything.
Nothing happens in any other process, or when the variable is unset.
"""

import os
import sys
import time


def _install(role: str, kind: str, after: int, seconds: float) -> None:
    from workers.model.torch_runner import ModelRunner

    forward = ModelRunner.forward_batch
    calls = 0

    def faulty_forward(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == after:
            if kind == "raise":
                raise RuntimeError(f"injected fault in the {role} model at forward call {calls}")
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
        return forward(self, *args, **kwargs)

    ModelRunner.forward_batch = faulty_forward


def _configure() -> None:
    fault = os.environ.get("SPECPIPE_TEST_FAULT")
    if not fault or "worker" not in sys.argv:
        return
    role, kind, after, *seconds = fault.split(":")
    argv = sys.argv
    if "--role" in argv and argv[argv.index("--role") + 1] == role:
        if kind == "load":
            raise RuntimeError(f"injected fault while the {role} worker starts")
        _install(role, kind, int(after), float(seconds[0]) if seconds else 0.0)


_configure()
