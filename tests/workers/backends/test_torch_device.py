import pytest
import torch

from workers.backends.torch_device import resolve_device, resolve_dtype, set_cpu_threads
from workers.errors import DeviceError


def test_cpu_resolves():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu0", "cuda:99"])
def test_bad_devices_are_refused_by_name(name):
    with pytest.raises(DeviceError, match=name):
        resolve_device(name)


def test_dtypes():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    with pytest.raises(DeviceError, match="float8"):
        resolve_dtype("float8")


def test_threads_must_be_positive():
    with pytest.raises(DeviceError, match="at least 1"):
        set_cpu_threads(0)


def _in_own_session(code: str) -> str:
    """Runs `code` in a child process in a session of its own (as launch starts workers); its stdout."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          start_new_session=True).stdout


def test_lower_priority_nices_the_workers_session_too():
    # A worker in its own session competes with the coordinator as a task group; only the group's
    # nice makes it yield (the coordinator's sends stalled for milliseconds without it).
    import os

    if not os.path.exists("/proc/self/autogroup"):
        pytest.skip("this kernel has no autogroup scheduling")
    out = _in_own_session("import os; from workers.backends.torch_device import lower_priority; lower_priority(7); "
                          "print(os.getpriority(os.PRIO_PROCESS, 0)); print(open('/proc/self/autogroup').read())")
    task_nice, group = out.splitlines()[:2]
    assert int(task_nice) >= 7
    assert group.endswith("nice 7")


def test_lower_priority_without_autogroup_still_nices_the_task():
    out = _in_own_session("import os; from workers.backends.torch_device import lower_priority; "
                          "lower_priority(3, autogroup='/nonexistent/autogroup'); print(os.getpriority(os.PRIO_PROCESS, 0))")
    assert int(out) >= 3


def test_lower_priority_leaves_a_session_it_does_not_lead_alone():
    # `specpipe worker --nice` typed at a shell must not nice the user's terminal session.
    import os

    if not os.path.exists("/proc/self/autogroup"):
        pytest.skip("this kernel has no autogroup scheduling")
    out = _in_own_session(
        "import subprocess, sys; subprocess.run([sys.executable, '-c', 'from workers.backends.torch_device import "
        "lower_priority; lower_priority(6)'], check=True); print(open('/proc/self/autogroup').read())")
    assert out.strip().endswith("nice 0")


def test_pin_threads_moves_every_thread_and_restore_gives_each_its_own_back():
    import os

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    code = f"""
import os, threading
from workers.backends.torch_device import pin_threads, restore_threads
started, stop = threading.Event(), threading.Event()
def helper():
    os.sched_setaffinity(0, {{{cores[1]}}})  # a thread someone pinned on purpose
    started.set(); stop.wait()
thread = threading.Thread(target=helper); thread.start(); started.wait()
helper_tid = thread.native_id
before = pin_threads({{{cores[0]}}})
print(sorted(os.sched_getaffinity(helper_tid)), sorted(os.sched_getaffinity(0)))
restore_threads(before, set({cores}))
print(sorted(os.sched_getaffinity(helper_tid)), sorted(os.sched_getaffinity(0)))
stop.set(); thread.join()
"""
    pinned, restored = _in_own_session(code).splitlines()
    assert pinned == f"[{cores[0]}] [{cores[0]}]"  # the helper too, not just the calling thread
    assert restored == f"[{cores[1]}] {cores}"


def test_the_threads_a_zmq_socket_starts_can_be_pinned_apart():
    """How a worker finds ZeroMQ's threads: those its context's first socket starts, at once (libzmq
    names them only later, from inside each thread)."""
    import os

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    code = f"""
import os, time, zmq
from workers.backends.torch_device import pin_thread_ids, pin_threads, running_threads
context = zmq.Context()
before = running_threads()
socket = context.socket(zmq.DEALER)
started = running_threads() - before
pin_threads({{{cores[1]}}})
pin_thread_ids(started, {{{cores[0]}}})
time.sleep(0.2)  # the threads name themselves
names = {{tid: open(f"/proc/self/task/{{tid}}/comm").read().strip() for tid in os.listdir("/proc/self/task")}}
names[str(os.getpid())] = "main"
print(len(started), sorted((name, sorted(os.sched_getaffinity(int(tid)))) for tid, name in names.items()))
socket.close(); context.term()
"""
    started, placement = _in_own_session(code).split(" ", 1)
    assert int(started) == 2
    assert f"('ZMQbg/IO/0', [{cores[0]}])" in placement and f"('ZMQbg/Reaper', [{cores[0]}])" in placement
    assert f"('main', [{cores[1]}])" in placement  # the worker's own thread stays
