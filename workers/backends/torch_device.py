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

    With autogroup scheduling (Linux's default on desktops and many VMs), every session is its own task
    group and groups share a core by their group's nice value, not their tasks': a worker started in a
    session of its own (as `launch` starts them) competes with the coordinator as an equal however nice
    it is. Measured on the bundled pair (2-vCPU EPYC VM): the coordinator's sends, on the draft's core,
    took p90 2-3 ms with only the task's nice and 0.17 ms with the session's too; overlap k=2 went from
    1.53x to 1.69x target-only, the coordinator from 14% to 6% of the wall. Raising one's own session's
    nice needs no privilege; where autogroup is absent the file is too, and the task's nice is all."""
    os.nice(nice)
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
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
