"""Bad user input: one clear line, a non-zero exit, and nothing half-started left running."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import pipeline.runtime.cluster
from pipeline.cli.main import main
from workers.bundled import DRAFT_DIR, TARGET_DIR


@pytest.fixture
def no_process_may_start(monkeypatch):
    started = []
    monkeypatch.setattr(pipeline.runtime.cluster.subprocess, "Popen", lambda *a, **k: started.append(a) or 1 / 0)
    yield
    assert started == [], "a worker process was started"


def checkpoint_without_tokenizer(tmp_path: Path, checkpoints) -> Path:
    return checkpoints["llama-tied"][0]


def long_prompts_file(tmp_path: Path) -> Path:
    file = tmp_path / "long.jsonl"
    file.write_text(json.dumps("x = 1\n" * 600) + "\n")  # well over the 1024-token context
    return file


def not_json_file(tmp_path: Path) -> Path:
    file = tmp_path / "not.jsonl"
    file.write_text("def f(x):\n")
    return file


def foreign_draft(tmp_path: Path, checkpoints) -> Path:
    """A checkpoint with the target's tokenizer files but a vocabulary of 128."""
    foreign = tmp_path / "foreign"
    shutil.copytree(checkpoints["llama-tied"][0], foreign)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TARGET_DIR / name, foreign / name)
    return foreign


def config_only(tmp_path: Path, checkpoints) -> Path:
    directory = tmp_path / "config-only"
    directory.mkdir()
    shutil.copy(DRAFT_DIR / "config.json", directory)
    return directory


CASES = {
    "empty prompt": (lambda t, c: ["--prompt", ""], "prompt 1 is empty"),
    "prompt longer than the context": (lambda t, c: ["--prompts-file", str(long_prompts_file(t))],
                                       "context holds 1024"),
    "k below 1": (lambda t, c: ["--k", "0"], "--k must be between 1 and 1023"),
    "k beyond the context": (lambda t, c: ["--k", "1024"], "--k must be between 1 and 1023"),
    "negative temperature": (lambda t, c: ["--temperature", "-0.5"], "temperature must be >= 0"),
    "top-p of 0": (lambda t, c: ["--top-p", "0"], "top-p must lie in (0, 1]"),
    "top-p above 1": (lambda t, c: ["--top-p", "1.01"], "top-p must lie in (0, 1]"),
    "nonexistent checkpoint": (lambda t, c: ["--target", str(t / "nowhere")], "--target: checkpoint directory"),
    "directory that is not a checkpoint": (lambda t, c: ["--draft", str(t)], "--draft: "),
    "checkpoint without weights": (lambda t, c: ["--draft", str(config_only(t, c))], "no *.safetensors weights"),
    "target without a tokenizer": (lambda t, c: ["--target", str(c["llama-tied"][0])], "no tokenizer files"),
    "vocabularies differ": (lambda t, c: ["--draft", str(foreign_draft(t, c))], "do not share a vocabulary"),
    "no such CUDA device": (lambda t, c: ["--target-device", "cuda:7"], "--target-device: device 'cuda:7'"),
    "no such device type": (lambda t, c: ["--draft-device", "quantum"], "--draft-device: unknown device"),
    "unknown dtype": (lambda t, c: ["--dtype", "int3"], "'--dtype': 'int3' is not one of"),
    "zero concurrency": (lambda t, c: ["--concurrency", "0"], "--concurrency must be at least 1"),
    "heartbeat timeout below its interval": (lambda t, c: ["--heartbeat-timeout", "0.2"], "--heartbeat-interval"),
    "temperature not a number": (lambda t, c: ["--temperature", "nan"], "--temperature and --top-p must be finite"),
    "negative seed": (lambda t, c: ["--seed", "-1"], "--seed must lie in [0, 2**63)"),
    "zero threads": (lambda t, c: ["--threads", "0"], "--threads must be at least 1"),
    "a list of k": (lambda t, c: ["--k", "2,3"], "'--k': '2,3' is a list"),
    "not a number": (lambda t, c: ["--max-new-tokens", "many"], "'--max-new-tokens': 'many' is not a valid integer"),
    "unknown mode": (lambda t, c: ["--mode", "eager"], "'--mode': 'eager' is not one of"),
    "an option of another command": (lambda t, c: ["--warmup", "2"], "No such option '--warmup'"),
    "prompts file not JSON": (lambda t, c: ["--prompts-file", str(not_json_file(t))],
                              "not.jsonl:1 is not a JSON string"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_before_any_process_starts(case, tmp_path, checkpoints, no_process_may_start):
    make_args, expected = CASES[case]
    result = CliRunner().invoke(main, ["launch", *make_args(tmp_path, checkpoints)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specpipe: error: ") and expected in lines[0], result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_a_worker_that_cannot_load_its_checkpoint_stops_the_launch_cleanly(tmp_path):
    broken = tmp_path / "broken-draft"
    shutil.copytree(DRAFT_DIR, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)  # passes every check short of reading it
    result = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "launch", "--draft", str(broken), "--prompt", "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "[draft]" in last and "cannot read weights" in last, result.stderr
    survivors = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_mentions(p, str(broken))]
    assert survivors == []


def _cmdline_mentions(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False
