"""scripts/train_pair.py at toy sizes: the target's pre-training, then `specpipe distill` for it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_pair.py"

pytestmark = pytest.mark.slow


def test_a_tiny_pair_is_trained_distilled_and_exported(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("decoder.py", "encoder.py", "scanner.py"):
        shutil.copy(Path(json.__file__).parent / name, corpus / name)
    export = tmp_path / "export"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--corpus", str(corpus), "--out", str(tmp_path / "run"),
                           "--target-steps", "4", "--draft-steps", "4", "--batch", "4", "--seq-len", "64",
                           "--generations", "4", "--vocab-size", "512", "--export", str(export)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    draft, target = AutoModelForCausalLM.from_pretrained(export / "draft"), AutoModelForCausalLM.from_pretrained(export / "target")
    assert draft.config.vocab_size == target.config.vocab_size == len(AutoTokenizer.from_pretrained(export / "draft"))
    card = json.loads((export / "draft" / "training.json").read_text())
    assert card["distilled_from"] == str(tmp_path / "run" / "target") and card["steps"] == 4
    assert set(card["evaluation"]["k"]) == {"1", "3", "5"}
    assert not (export / "draft" / "state").exists()  # the resumable state stays in the working directory
