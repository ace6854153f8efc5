import os
import time

import pytest

from pipeline.bench.background import BackgroundLoad, running


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_the_busy_processes_run_pinned_and_niced_and_are_gone_after_the_run():
    core = min(os.sched_getaffinity(0))
    load = BackgroundLoad(background_load=2, background_nice=7, background_cores=(core,))
    with running(load) as pids:
        assert len(pids) == 2
        time.sleep(0.5)
        for pid in pids:
            assert os.sched_getaffinity(pid) == {core}
            assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 7
            assert cpu_seconds(pid) > 0.05  # spinning, not sleeping
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_they_are_ended_when_the_run_fails():
    with pytest.raises(RuntimeError), running(BackgroundLoad(background_load=1)) as pids:
        raise RuntimeError("the bench failed")
    assert not os.path.exists(f"/proc/{pids[0]}")


def test_the_load_is_spread_over_the_cores_and_described_as_run():
    cores = sorted(os.sched_getaffinity(0))
    load = BackgroundLoad(background_load=len(cores) + 1)
    assert load.cores() == [*cores, cores[0]]
    assert load.describe() == f"{len(cores) + 1} busy process(es) at nice 5 on core(s) {','.join(map(str, cores))}"
    assert BackgroundLoad().describe() == "none" and BackgroundLoad().cores() == []


@pytest.mark.parametrize("load, option", [
    (BackgroundLoad(background_load=-1), "--background-load"),
    (BackgroundLoad(background_nice=20), "--background-nice"),
    (BackgroundLoad(background_load=1, background_cores=(10_000,)), "--background-cores"),
])
def test_bad_values_name_their_option(load, option):
    with pytest.raises(ValueError, match=option):
        load.validate()
