"""`specpipe bench --background-load N`: busy processes beside everything bench measures.

A deployer's machine is rarely idle: a compile, a test run or a neighbouring service shares its cores.
These processes stand in for that: each spins in a loop, at niceness --background-nice, pinned to one
of --background-cores in turn (default: every core bench may use), started before the workers and
ended with the run, so that the loaded case is measured beside the idle one with the same command.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

BUSY_LOOP = "while True:\n    pass\n"


@dataclass(frozen=True)
class BackgroundLoad:
    """What runs beside the measured pipeline (none by default)."""

    background_load: int = 0  # busy processes
    background_nice: int = 5  # their niceness: 0 = as the workers, 19 = yield to anything
    background_cores: tuple[int, ...] = ()  # each pinned to the next of these; () = every core bench may use

    def validate(self) -> None:
        if self.background_load < 0:
            raise ValueError(f"--background-load takes a count of busy processes (0 = none), got "
                             f"{self.background_load}")
        if not 0 <= self.background_nice <= 19:
            raise ValueError(f"--background-nice takes a niceness from 0 to 19 (a process may only lower its "
                             f"priority), got {self.background_nice}")
        unknown = sorted(set(self.background_cores) - os.sched_getaffinity(0))
        if unknown:
            raise ValueError(f"--background-cores names cores this process may not use: "
                             f"{','.join(map(str, unknown))} (it may use {_cores_text(os.sched_getaffinity(0))})")

    def cores(self) -> list[int]:
        """The core of each busy process, in turn over --background-cores."""
        pool = list(self.background_cores) or sorted(os.sched_getaffinity(0))
        return [pool[i % len(pool)] for i in range(self.background_load)]

    def describe(self) -> str:
        if not self.background_load:
            return "none"
        return (f"{self.background_load} busy process(es) at nice {self.background_nice} on core(s) "
                f"{_cores_text(self.cores())}")


def _cores_text(cores) -> str:
    return ",".join(map(str, sorted(set(cores))))


def _become(nice: int, core: int):
    def prepare() -> None:  # in the child, before it runs Python
        os.nice(nice)
        os.sched_setaffinity(0, {core})

    return prepare


@contextlib.contextmanager
def running(load: BackgroundLoad) -> Iterator[list[int]]:
    """Starts the busy processes and yields their pids; kills them on the way out, whatever happens."""
    processes: list[subprocess.Popen] = []
    try:
        for core in load.cores():
            processes.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                                              preexec_fn=_become(load.background_nice, core)))
        yield [process.pid for process in processes]
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()
