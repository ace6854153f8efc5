import os
import subprocess
import sys
import time

import pytest

from workers.spin import PREEMPTED_S, Spinner


class Core:
    """A hand-driven clock, and a count of the times another task ran in our place."""

    def __init__(self) -> None:
        self.now = 0.0
        self.switches = 0
        self.turns = 0

    def clock(self) -> float:
        return self.now

    def turn(self, seconds: float = 1e-6, others_ran: bool = False) -> None:
        self.now += seconds
        self.switches += others_ran
        self.turns += 1


def spinner(core: Core, spin_s: float = 0.05, **kwargs) -> Spinner:
    return Spinner(spin_s, clock=core.clock, yield_core=kwargs.pop("yield_core", core.turn),
                   switches=lambda: core.switches, **kwargs)


def test_on_a_core_of_its_own_it_spins_until_the_message_or_the_spin_time():
    core = Core()
    arrives_at = 0.01
    assert spinner(core).spin(lambda: core.now >= arrives_at)
    assert core.turns > 1000  # it never slept: each turn yielded the core, which nobody else wanted
    core.now = 0.0
    assert not spinner(core).spin(lambda: False) and core.now == pytest.approx(0.05, abs=1e-5)
    core.now = 0.0
    assert not spinner(core).spin(lambda: False, limit_s=0.001) and core.now == pytest.approx(0.001, abs=1e-5)


def test_once_another_task_takes_the_core_it_sleeps_instead_for_a_while():
    core = Core()
    busy = Core()
    mine = spinner(busy, rest_s=1.0, yield_core=lambda: busy.turn(3e-3, others_ran=True))  # a background job's slice
    assert not mine.spin(lambda: False)
    assert busy.turns == 1 and mine.preemptions == 1  # gave up at the first sign, not after 50 ms of turns
    turns = busy.turns
    assert not mine.spin(lambda: False)  # resting: one look, no spinning
    assert busy.turns == turns
    busy.now += 1.0
    assert not mine.spin(lambda: False)  # rested: it tries again (and meets the job again)
    assert mine.preemptions == 2
    assert spinner(core).spin(lambda: True) and core.turns == 0


def test_a_gap_the_kernel_did_not_fill_with_another_task_is_not_a_reason_to_stop():
    # the hypervisor took the vCPU away for a moment: sleeping would not have helped anyone
    core = Core()
    mine = spinner(core, yield_core=lambda: core.turn(10 * PREEMPTED_S))
    assert not mine.spin(lambda: False)
    assert mine.preemptions == 0 and core.turns > 10


def test_spinning_can_be_off():
    core = Core()
    assert not spinner(core, spin_s=0.0).spin(lambda: False) and core.turns == 0
    with pytest.raises(ValueError, match="never negative"):
        Spinner(-1.0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_a_real_busy_neighbour_on_its_core_makes_it_stop_spinning():
    core = min(os.sched_getaffinity(0))
    neighbour = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    saved = os.sched_getaffinity(0)
    try:
        time.sleep(0.2)  # the neighbour is pinned and spinning
        os.sched_setaffinity(0, {core})
        mine = Spinner(0.5)
        began = time.perf_counter()
        assert not mine.spin(lambda: False)
        assert mine.preemptions == 1 and time.perf_counter() - began < 0.25
    finally:
        os.sched_setaffinity(0, saved)
        neighbour.kill()
        neighbour.wait()
