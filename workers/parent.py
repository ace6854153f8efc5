"""A worker spawned by a coordinator must not outlive it, even when the coordinator is SIGKILLed."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int) -> None:
    """Has the kernel send this process SIGTERM when its parent dies (Linux; elsewhere a no-op).

    Call after the SIGTERM handler is installed. If the parent is already gone (it died before the
    request took effect), SIGTERM is sent at once.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
