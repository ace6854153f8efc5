"""Choosing a torch device, dtype and the CPU threads a worker process may use."""

from __future__ import annotations

import os

import torch

from workers.errors import DeviceError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', checked against what this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {name!r} is not supported by the torch backend; use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but this machine has no CUDA GPU; use 'cpu'")
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise DeviceError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


AUTOGROUP = "/proc/self/autogroup"


def lower_priority(nice: int, autogroup: str = AUTOGROUP) -> None:
    """Makes this process yield its core to normal-priority ones: its nice value, and its session's.

    With autogroup scheduling (Linux's default on desktops and many VMs) every session is a task group,
    and groups share a core by the group's nice value, not their tasks'. `launch` starts each worker in
    a session of its own, so a draft niced as a task alone still competes with the coordinator as an
    equal. A worker that leads its session therefore nices the session too (raising one's own session's
    nice needs no privilege; without autogroup the file is absent and the task's nice is all there is)."""
    os.nice(nice)
    if os.getsid(0) != os.getpid():
        return  # started from a shell: its session (the user's terminal) is not ours to nice
    try:
        with open(autogroup, "w") as group:
            group.write(str(nice))
    except OSError:
        pass  # no autogroup here (or the kernel refused): sessions do not compete as groups


def set_cpu_threads(threads: int, cores: list[int] | None = None) -> None:
    """Limits this process to `threads` intra-op threads, optionally pinned to `cores`."""
    if threads < 1:
        raise DeviceError(f"thread count must be at least 1, got {threads}")
    if cores:
        available = os.sched_getaffinity(0)
        unknown = sorted(set(cores) - available)
        if unknown:
            raise DeviceError(f"cannot pin to core(s) {unknown}: this process may use cores {sorted(available)}")
        pin_threads(cores)
    torch.set_num_threads(threads)


def pin_threads(cores: set[int] | list[int]) -> dict[int, set[int]]:
    """Pins every thread of this process to `cores` (threads started later inherit it from theirs);
    returns each thread's affinity before, for `restore_threads`.

    sched_setaffinity(0, ...) moves the calling thread alone, and by the time a worker pins itself
    ZeroMQ's I/O thread, its reaper and the connection monitor are running, free to land on any core:
    on the target's, each message they carry for the draft preempts the target."""
    before = {}
    for tid in _threads():
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:
            pass  # the thread ended meanwhile
    return before


def pin_thread_ids(threads: set[int], cores: set[int] | list[int]) -> None:
    """Pins the given threads of this process (ids from `running_threads`) to `cores`.

    A worker that owns its core puts its ZeroMQ context's threads (the ones its first socket started)
    on the coordinator's instead: each message it sends wakes its I/O thread, which, sharing the core,
    preempts the worker until the bytes are out."""
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:
            pass  # the thread ended meanwhile


def running_threads() -> set[int]:
    """The ids of this process's threads now."""
    return set(_threads())


def restore_threads(before: dict[int, set[int]], default: set[int]) -> None:
    """Gives every thread its affinity from before `pin_threads`; threads started since get `default`."""
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, before.get(tid, default))
        except ProcessLookupError:
            pass


def _threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]  # no /proc: the calling thread is all we can reach
