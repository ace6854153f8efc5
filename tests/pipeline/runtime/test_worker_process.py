"""Workers start so that no file of the user's can break them, and a worker that dies says why."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime.worker_process import worker_command
from tests.pipeline.processes import start_launch

SPECPIPE = Path(sys.executable).parent / "specpipe"  # the console script, as a user runs it
SHADOWING = ("queue.py", "struct.py", "types.py", "token.py", "profile.py")  # names of modules workers import


def test_the_users_directory_and_pythonpath_cannot_shadow_what_a_worker_imports(tmp_path, monkeypatch):
    (tmp_path / "queue.py").write_text('raise ImportError("the user\'s queue.py was imported")\n')
    # a coordinator that found something on the user's PYTHONPATH: that directory is on its sys.path, first
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    command = worker_command(["--role", "draft"])
    monkeypatch.undo()
    assert command[:3] == [sys.executable, "-I", "-c"] and command[-3:] == ["worker", "--role", "draft"]
    assert repr(str(tmp_path)) in command[3]  # the worker can still import what only that directory holds
    # the worker's bootstrap, up to where it would start the worker: which queue does it get?
    probe = command[3].replace("from pipeline.cli.main import run\nrun()\n", "import queue\nprint(queue.__file__)\n")
    for env in ({}, {"PYTHONPATH": str(tmp_path)}):
        done = subprocess.run([*command[:3], probe], capture_output=True, text=True, cwd=tmp_path,
                              env=dict(os.environ, **env), timeout=60)
        assert done.returncode == 0, done.stderr
        assert Path(done.stdout.strip()).parent == Path(os.__file__).parent  # the standard library's


@pytest.mark.slow
def test_launch_from_a_directory_of_shadowing_files_generates_as_usual(tmp_path):
    for name in SHADOWING:
        (tmp_path / name).write_text(f'raise ImportError("{name} in the user\'s directory was imported")\n')
    if not SPECPIPE.exists():
        pytest.skip(f"no console script at {SPECPIPE} (install with pip install -e .)")
    done = subprocess.run([str(SPECPIPE), "launch", "--prompt", "def add(a, b):\n", "--max-new-tokens", "24",
                           "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "in the user's directory was imported" not in done.stderr
    assert '"new_tokens": 24' in done.stdout


@pytest.mark.slow
def test_a_worker_that_dies_while_loading_is_named_with_its_own_error():
    launch = start_launch("--prompt", "x", "--max-new-tokens", "4", fault="target:load:0")
    stdout, stderr = launch.communicate(timeout=180)
    last = stderr.decode().strip().splitlines()[-1]
    assert launch.returncode != 0 and stdout == b""
    assert "[target]" in last and "before READY" in last, last
    assert "its last line: RuntimeError: injected fault while the target worker starts" in last, last
