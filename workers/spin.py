"""Busy-polling that gives way: a process waiting for its next message spins only on a core nobody else needs.

Waking a sleeping process costs hundreds of microseconds on a VM (a halted vCPU), so the target, the
coordinator and a draft sharing the coordinator's core poll without sleeping for a while after each
message. On a shared machine that spinning is the harm: a background job (a compile, a test run, a
neighbouring service) on the same core loses the time a spinner burns, and a spinner that has been
preempted learns of its next message only when its turn comes back, milliseconds later, where a
sleeping process would have been woken at once. So a `Spinner` yields the core at every turn of its
loop (any other runnable task on the core runs first), and the first time it finds that another task
ran in its place (a gap between two turns, and the kernel's count of this thread's involuntary switches
moved: a gap alone may be the hypervisor's, which no sleeping would help) it stops spinning and sleeps
instead, for `rest_s`: then it tries again.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable

PREEMPTED_S = 200e-6  # a gap this long between two turns of the loop: another task ran on this core
REST_S = 1.0  # after a preemption, how long to sleep on every wait before spinning again


def involuntary_switches() -> int:
    """Times this thread was switched out while runnable (a yield that let another task run counts)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw


class Spinner:
    """Polls `ready` without sleeping for up to `spin_s`, unless the core was found to be wanted elsewhere."""

    def __init__(self, spin_s: float, rest_s: float = REST_S, clock: Callable[[], float] = time.perf_counter,
                 yield_core: Callable[[], None] = os.sched_yield,
                 switches: Callable[[], int] = involuntary_switches) -> None:
        if spin_s < 0 or rest_s < 0:
            raise ValueError(f"spin and rest times are never negative, got {spin_s} and {rest_s}")
        self.spin_s = spin_s
        self.rest_s = rest_s
        self.clock = clock
        self.yield_core = yield_core
        self.switches = switches
        self.resting_until = float("-inf")
        self.preemptions = 0  # times a spin gave way

    def spin(self, ready: Callable[[], bool], limit_s: float | None = None) -> bool:
        """True as soon as `ready()` is; False when the caller should block instead: the spin time (or
        `limit_s`) is up, the core was wanted by another task on this spin, or it was on a recent one."""
        now = self.clock()
        if self.spin_s <= 0 or now < self.resting_until:
            return ready()
        deadline = now + (self.spin_s if limit_s is None else min(self.spin_s, limit_s))
        switched = self.switches()
        while True:
            if ready():
                return True
            self.yield_core()
            last, now = now, self.clock()
            if now - last > PREEMPTED_S and self.switches() != switched:
                self.preemptions += 1
                self.resting_until = now + self.rest_s
                return False
            if now >= deadline:
                return False
