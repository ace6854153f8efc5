"""The layering contracts in pyproject.toml ([tool.importlinter]) hold, and they do catch a shortcut."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the packages under `root`, with `root`'s pyproject.toml."""
    return subprocess.run([*LINT, "--no-cache"], cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_layering_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture
def copy_of_the_tree(tmp_path):
    for package in ("pipeline", "workers"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("models", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize("module, line, broken", [
    ("workers/slots.py", "from pipeline.config import DecodeConfig", "nothing in workers/ imports pipeline/"),
    ("pipeline/scheduler.py", "import zmq", "the scheduler imports no ZeroMQ"),
    ("pipeline/scheduler.py", "from pipeline.transport import ZmqTransport", "the scheduler imports no ZeroMQ"),
    ("workers/model/llama.py", "from workers.protocol.messages import Ready", "the model runner imports no message"),
    ("pipeline/scheduler.py", "from pipeline.engine import Engine", "within pipeline/"),
    ("workers/model/runner.py", "from workers.slots import SequenceSlots", "within workers/"),
])
def test_a_shortcut_across_the_layers_breaks_a_contract(copy_of_the_tree, module, line, broken):
    path = copy_of_the_tree / module
    path.write_text(path.read_text() + f"\n{line}\n")
    result = lint_imports(copy_of_the_tree)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout
