"""scripts/make_shaped_checkpoint.py: a public model's shape (cut to a few layers), loadable, with a real draft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from workers.model import ModelRunner
from workers.model.checkpoint import load_tokenizer, read_config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_shaped_checkpoint.py"


def test_a_smollm2_shaped_pair_loads_and_its_draft_is_the_targets_first_layers(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--shape", "smollm2-135m", "--layers", "3", "--draft-layers",
                           "1", "--out", str(tmp_path), "--check", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "greedy agreement" in done.stdout
    target, draft = read_config(tmp_path / "target"), read_config(tmp_path / "draft")
    # SmolLM2-135M's published shape: 576 wide, 9 heads over 3 KV heads, FFN 1536, 49,152 tokens, tied
    assert (target.hidden_size, target.num_heads, target.num_kv_heads, target.intermediate_size) == (576, 9, 3, 1536)
    assert (target.vocab_size, target.tie_word_embeddings, target.num_layers, draft.num_layers) == (49152, True, 3, 1)
    with safe_open(str(tmp_path / "target" / "model.safetensors"), "pt") as t, \
            safe_open(str(tmp_path / "draft" / "model.safetensors"), "pt") as d:
        assert set(d.keys()) < set(t.keys())
        assert all(torch.equal(d.get_tensor(name), t.get_tensor(name)) for name in d.keys())
    tokenizer = load_tokenizer(tmp_path / "target")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    runner = ModelRunner.from_checkpoint(tmp_path / "target", dtype="fp16-weights", max_seq_len=64)
    assert runner.forward(tokenizer.encode("def f(x):"), 0).shape[-1] == 49152
    assert json.loads((tmp_path / "target" / "config.json").read_text())["torch_dtype"] == "bfloat16"
