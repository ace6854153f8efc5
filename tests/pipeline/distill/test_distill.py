"""`specpipe distill` end to end on a tiny target: a checkpoint transformers loads, resumable, lossless in use."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pipeline.algorithm.generation import ModelLimits, generate
from pipeline.config import DecodeConfig
from pipeline.runtime.in_process import LocalTransport
from workers.bundled import HELDOUT_PROMPTS, TARGET_DIR
from workers.model import ModelRunner
from workers.model.checkpoint import load_tokenizer
from workers.worker_settings import AUTO_DTYPE, resolved_dtype

TINY_DRAFT = ["--layers", "1", "--width", "32"]
QUICK = ["--batch-size", "4", "--seq-len", "64", "--generations", "4", "--prompts", "2", "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> Path:
    """A random Llama target (2 layers, 64 wide) with the bundled tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-target")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(TARGET_DIR).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("corpus")
    source = Path(json.__file__).parent
    for name in ("decoder.py", "encoder.py", "scanner.py", "tool.py"):
        shutil.copy(source / name, directory / name)
    shutil.copy(source / "decoder.py", directory / "copy_of_decoder.py")  # a duplicate, to be dropped
    return directory


def distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", "distill", *args], capture_output=True, text=True,
                          timeout=240)


@pytest.fixture(scope="module")
def distilled(tiny_target, corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("draft")
    done = distill("--target", str(tiny_target), "--out", str(out), "--corpus", str(corpus), "--steps", "8",
                   *TINY_DRAFT, *QUICK, "--json-out", str(out / "eval.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_the_draft_is_a_checkpoint_transformers_loads_with_the_targets_tokenizer(distilled, tiny_target):
    out, _ = distilled
    draft = AutoModelForCausalLM.from_pretrained(out)
    assert (draft.config.num_hidden_layers, draft.config.hidden_size, draft.config.vocab_size) == (1, 32, 4096)
    assert draft.config.max_position_embeddings == 256  # the target's context
    tokenizer, target_tokenizer = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_target)
    text = "def f(x):\n    return x + 1\n"
    assert tokenizer(text)["input_ids"] == target_tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = draft(torch.tensor([tokenizer(text)["input_ids"]])).logits
    assert logits.shape[-1] == 4096 and torch.isfinite(logits).all()


def test_the_run_reports_agreement_acceptance_at_1_3_5_and_cost(distilled, tiny_target):
    out, done = distilled
    assert "greedy agreement:" in done.stdout
    for k in (1, 3, 5):
        assert f"k={k}: acceptance rate" in done.stdout
    assert "draft = 1/" in done.stdout
    figures = json.loads((out / "eval.json").read_text())
    # the cost is timed on the runners `launch` gives a CPU worker (--dtype auto), not the fp32 ones that score
    launched = ModelRunner.from_checkpoint(tiny_target, dtype=resolved_dtype(AUTO_DTYPE, "cpu"))
    assert figures["cost_numerics"] == launched.numerics and f"({launched.numerics})" in done.stdout
    assert set(figures["k"]) == {"1", "3", "5"} and 0 <= figures["agreement"] <= 1
    for k, window in figures["k"].items():
        assert 1 <= window["mean_acceptance_length"] <= int(k) + 1
    card = json.loads((out / "training.json").read_text())
    assert (card["steps"], card["corpus_files"]) == (8, 4)  # the duplicate file was dropped
    assert card["evaluation"]["agreement"] == figures["agreement"]
    assert "1 duplicates dropped" in done.stderr


def test_a_rerun_with_more_steps_resumes_where_it_stopped(distilled, tiny_target, corpus):
    out, _ = distilled
    done = distill("--target", str(tiny_target), "--out", str(out), "--corpus", str(corpus), "--steps", "10",
                   *TINY_DRAFT, *QUICK)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming at step 8" in done.stderr
    assert json.loads((out / "training.json").read_text())["steps"] == 10


@pytest.mark.parametrize("mode", ["serial", "overlap"])
def test_speculating_with_the_distilled_draft_gives_the_targets_own_tokens(distilled, tiny_target, mode):
    out, _ = distilled
    draft = ModelRunner.from_checkpoint(out, n_slots=2, max_seq_len=256)
    target = ModelRunner.from_checkpoint(tiny_target, n_slots=2, max_seq_len=256)
    tokenizer = load_tokenizer(tiny_target)
    texts = [json.loads(line) for line in HELDOUT_PROMPTS.read_text().splitlines()[:2]]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"][:40] for text in texts]
    limits = ModelLimits(4096, frozenset(target.config.eos_token_ids), 256)

    def tokens(config: DecodeConfig) -> list[list[int]]:
        sequences, _ = generate(LocalTransport(draft, target), prompts, config, limits)
        return [sequence.generated for sequence in sequences]

    alone = tokens(DecodeConfig(mode="target-only", max_new_tokens=24))
    assert tokens(DecodeConfig(mode=mode, k=3, max_new_tokens=24, k_policy="fixed")) == alone


def test_eval_only_measures_a_pair_without_training(tiny_target, tmp_path):
    # The target as its own draft: every drafted token is the target's, so agreement and acceptance are total.
    done = distill("--eval-only", "--draft", str(tiny_target), "--target", str(tiny_target), "--prompts", "2",
                   "--max-new-tokens", "10", "--json-out", str(tmp_path / "eval.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["agreement"] == 1.0
    assert figures["k"]["5"]["acceptance_rate"] == 1.0
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(("args", "message"), [
    ([], "--out is required"),
    (["--out", "x", "--steps", "5", "--minutes", "1"], "give --steps or --minutes, not both"),
    (["--out", "x", "--width", "100"], "--width"),
    (["--out", "x", "--layers", "0"], "--layers must be at least 1"),
])
def test_bad_settings_are_one_line_naming_the_option(args, message):
    done = distill(*args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
