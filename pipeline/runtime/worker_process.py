"""How a worker process is started, and what it last said.

`python -m pipeline.cli.main worker` would put the current directory first on the worker's sys.path, so a
`struct.py` or `queue.py` where the user typed `specpipe launch` would shadow the standard library's
and kill the worker while it loads. Workers start in isolated mode instead (`python -I`: no current
directory, no PYTHONPATH, no user site-packages, no PYTHON* variables), and a short bootstrap then
appends the coordinator's own sys.path after the interpreter's: whatever the coordinator could import
the worker imports from the same place, and nothing the user adds can come before the standard library
or the installed packages. A `sitecustomize` on that path still runs, as it would without isolation.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading

_BOOTSTRAP = """\
import sys
sys.path += [entry for entry in {path!r} if entry not in sys.path]
try:
    import sitecustomize
except ImportError:
    pass
from pipeline.cli.main import run
run()
"""


def worker_command(args: list[str]) -> list[str]:
    """The command line of `specpipe worker ARGS` in an isolated interpreter (see the module docstring)."""
    path = [entry for entry in sys.path if entry and os.path.isabs(entry)]  # '' is the current directory
    return [sys.executable, "-I", "-c", _BOOTSTRAP.format(path=path), "worker", *args]


class OutputTail:
    """Copies a process's output (stdout and stderr, merged) to our stderr as it comes, line by line,
    and keeps its last lines, so that a worker that dies can be named with its own last words."""

    STDERR_FD = 2  # the descriptor, not sys.stderr: that may be a Python object without one (under pytest)

    def __init__(self, process: subprocess.Popen, keep: int = 20) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._stream = process.stdout
        self._thread = threading.Thread(target=self._copy, name="worker-output", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        for line in self._stream:  # ends when the process and every holder of its pipe are gone
            os.write(self.STDERR_FD, line)
            text = line.decode(errors="replace").strip()
            if text:
                self._lines.append(text)
        self._stream.close()

    def last_line(self, wait_s: float = 1.0) -> str:
        """The last line the process wrote (its error, when it died of one), once its output has ended."""
        self._thread.join(wait_s)
        return self._lines[-1] if self._lines else ""
