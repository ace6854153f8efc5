"""On a Tenstorrent Wormhole (n150, n300 or T3000) with ttnn installed: `pytest -m wormhole -s tests/workers/model`.

The bundled target on the chip against the torch runner (logits), speculative decoding with the ttnn target
against target-only (greedy identity), tokens/s for target-only, serial and overlap, and `specpipe launch
--backend ttnn` end to end. SPECPIPE_TT_DEVICE picks the device (default tt:0; tt:0/1x2 for both chips of an
n300). Skipped without ttnn or without a chip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.algorithm.generation import ModelLimits, generate
from pipeline.config import DecodeConfig
from pipeline.runtime.in_process import LocalTransport
from workers.backends.ttnn_device import device_configured
from workers.bundled import DRAFT_DIR, HELDOUT_PROMPTS, TARGET_DIR
from workers.model import ModelRunner
from workers.model.checkpoint import load_tokenizer
from workers.model.ttnn_runner import TtnnRunner, open_runner
from workers.worker_settings import WorkerSettings

pytestmark = [
    pytest.mark.wormhole,
    pytest.mark.skipif(not device_configured(), reason="no Tenstorrent chip on this host and no TT_METAL_SIMULATOR"),
]
DEVICE = os.environ.get("SPECPIPE_TT_DEVICE", "tt:0")
CONTEXT = 512


@pytest.fixture(scope="module")
def target() -> TtnnRunner:
    pytest.importorskip("ttnn")
    spec = WorkerSettings("target", str(TARGET_DIR), bind="", backend="ttnn", device=DEVICE, dtype="bfloat16", slots=4,
                      max_seq_len=CONTEXT)
    runner = open_runner(spec, lambda text: print(f"[target] {text}", file=sys.stderr))
    assert isinstance(runner, TtnnRunner)
    yield runner
    runner.opened.close()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tokenizer = load_tokenizer(TARGET_DIR)
    texts = [json.loads(line) for line in HELDOUT_PROMPTS.read_text().splitlines()[:8]]
    return [tokenizer(text, add_special_tokens=False)["input_ids"][:60] for text in texts]


def test_logits_match_the_torch_runner(target, prompts):
    tokens = torch.tensor(prompts[0] + prompts[1][:40])
    expected = ModelRunner.from_checkpoint(TARGET_DIR, max_seq_len=CONTEXT).forward(tokens, 0)
    bf16 = ModelRunner.from_checkpoint(TARGET_DIR, max_seq_len=CONTEXT, dtype="bfloat16").forward(tokens, 0)
    slot = target.allocate_slot()
    try:
        pieces = [target.forward(tokens[:50], 0, slot)]
        pieces += [target.forward(tokens[i : i + 1], i, slot) for i in range(50, 90)]
        pieces.append(target.forward(tokens[90:], 90, slot))
    finally:
        target.free_slot(slot)
    got = torch.cat(pieces)
    error, bf16_error = (got - expected).abs().max(), (bf16 - expected).abs().max()
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean()
    print(f"\nmax |logit error|: ttnn {error:.4f}, torch bf16 {bf16_error:.4f}; argmax agreement {agreement:.1%}")
    assert error <= 4 * bf16_error + 0.05 and agreement >= 0.95


def decode(target: TtnnRunner, prompts: list[list[int]], mode: str, k: int) -> tuple[list[list[int]], float]:
    draft = ModelRunner.from_checkpoint(DRAFT_DIR, max_seq_len=CONTEXT, n_slots=4)
    limits = ModelLimits(target.config.vocab_size, frozenset(target.config.eos_token_ids), CONTEXT)
    began = time.perf_counter()
    sequences, _ = generate(LocalTransport(None if mode == "target-only" else draft, target), prompts,
                            DecodeConfig(mode, k, 128, k_policy="fixed"), limits, concurrency=1)
    elapsed = time.perf_counter() - began
    return [s.generated for s in sequences], sum(len(s.generated) for s in sequences) / elapsed


def test_greedy_speculative_equals_target_only_and_tokens_per_second(target, prompts, capsys):
    decode(target, prompts[:1], "target-only", 1)  # warm-up and first trace captures, not counted
    baseline, target_only = decode(target, prompts, "target-only", 1)
    rates = {"target-only": target_only}
    for mode in ("serial", "overlap"):
        generated, rates[f"{mode} k=3"] = decode(target, prompts, mode, 3)
        assert generated == baseline, mode
    torch_generated, _ = decode(ModelRunner.from_checkpoint(TARGET_DIR, max_seq_len=CONTEXT, n_slots=4), prompts,
                                "target-only", 1)
    same = sum(a == b for x, y in zip(baseline, torch_generated) for a, b in zip(x, y))
    with capsys.disabled():
        print(f"\n{DEVICE}, draft on torch CPU, {len(prompts)} prompts x 128 tokens, greedy:")
        for name, rate in rates.items():
            print(f"  {name:12s} {rate:7.1f} tokens/s  ({rate / target_only:.2f}x target-only)")
        print(f"  tokens equal to the torch target's greedy output: {same}/{sum(map(len, baseline))}")
        print(f"  {target.timings.summary()}")


def test_launch_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "launch", "--backend", "ttnn", "--target-device", DEVICE,
         "--prompt", "def fibonacci(n):", "--max-new-tokens", "64", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["new_tokens"] == 64
    print(f"\nlaunch --backend ttnn: {row['tokens_per_s']:.1f} tokens/s, acceptance {row['acceptance_rate']:.1%}")
