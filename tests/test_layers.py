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
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("bundled", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize("module, line, broken", [
    ("workers/sequence_slots.py", "from pipeline.config import DecodeConfig", "nothing in workers/ imports pipeline/"),
    ("pipeline/algorithm/scheduler.py", "import zmq", "the algorithm knows no processes"),
    ("pipeline/algorithm/engine.py", "from workers.protocol.codec import encode", "the algorithm knows no processes"),
    ("pipeline/algorithm/scheduler.py", "from pipeline.runtime.transport import ZmqTransport", "the folders are the layers"),
    ("pipeline/runtime/cluster.py", "from pipeline.cli.options import DRAFT", "the folders are the layers"),
    ("pipeline/serving/app.py", "from pipeline.bench.config import BENCH_PEERS", "the folders are the layers"),
    ("pipeline/cli/parameters.py", "from pipeline.cli.options import DRAFT", "within pipeline/cli/"),
    ("pipeline/runtime/liveness.py", "from pipeline.runtime.transport import ZmqTransport", "within pipeline/runtime/"),
    ("workers/model/llama.py", "from workers.protocol.messages import Ready", "the model runner imports no message"),
    ("pipeline/algorithm/scheduler.py", "from pipeline.algorithm.engine import Engine", "within pipeline/algorithm/"),
    ("workers/model/torch_runner.py", "from workers.sequence_slots import SequenceSlots", "within workers/"),
])
def test_a_shortcut_across_the_layers_breaks_a_contract(copy_of_the_tree, module, line, broken):
    path = copy_of_the_tree / module
    path.write_text(path.read_text() + f"\n{line}\n")
    result = lint_imports(copy_of_the_tree)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout


# A reader looking for "the options" should not find two files, `option.py` and `options.py`.
NEAR_TWIN_SUFFIXES = ("s", "es", "er", "ers", "ing")


def module_names() -> dict[str, list[str]]:
    """Every module and package name under pipeline/ and workers/, with where it is."""
    names: dict[str, list[str]] = {}
    for package in ("pipeline", "workers"):
        for path in (ROOT / package).rglob("*"):
            if "__pycache__" in path.parts:
                continue
            if path.suffix == ".py" and path.stem != "__init__":
                names.setdefault(path.stem, []).append(str(path.relative_to(ROOT)))
            elif path.is_dir() and (path / "__init__.py").exists():
                names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    return names


def test_no_two_modules_differ_only_by_a_suffix():
    names = module_names()
    twins = [(names[name], names[name + suffix])
             for name in names for suffix in NEAR_TWIN_SUFFIXES if name + suffix in names]
    assert not twins, f"modules whose names differ only by a suffix: {twins}"


def test_the_pipeline_top_level_stays_small():
    top = [path.name for path in (ROOT / "pipeline").iterdir()
           if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists())]
    assert len(top) <= 12, sorted(top)
