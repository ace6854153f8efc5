"""Ctrl-C (SIGINT) and SIGTERM during `specpipe launch`: stop generating, keep what was made.

The first signal only raises a flag that the engine checks between replies, so it stops at a
consistent point, frees every sequence's KV slot in both workers and returns the partial results.
A second signal raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import signal
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CancelOnSignal:
    """While entered, SIGINT/SIGTERM set `signum` instead of killing; a second one interrupts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, object] = {}

    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "CancelOnSignal":
        for signum in SIGNALS:
            self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt like SIGINT does, so that `with` blocks stop the workers."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
