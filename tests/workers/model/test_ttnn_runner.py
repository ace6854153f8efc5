"""The ttnn runner's logic end to end, on a torch-backed stand-in for the ttnn calls it makes (no ttnn needed).

The same decoding checks as the torch runner: logits against the torch ModelRunner at every position
and in every way of feeding it, greedy tokens, rollback, slots; plus what is ttnn's own: decode replayed
from a trace equals eager, a 2-chip mesh equals one chip, and speculative decoding with a ttnn target
is token-identical to target-only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pipeline.algorithm.generation import ModelLimits, generate
from pipeline.config import DecodeConfig
from pipeline.runtime.in_process import LocalTransport
from tests.workers.model.ttnn_standin import Device, Standin
from workers.bundled import DRAFT_DIR, HELDOUT_PROMPTS, TARGET_DIR
from workers.errors import CacheCapacityError, UnsupportedModelError
from workers.model import ModelRunner
from workers.model.checkpoint import load_tokenizer, read_config, read_hf_weights
from workers.model.ttnn_llama import host_weights
from workers.model.ttnn_runner import TtnnRunner

# head_dim 64 and vocab in whole tiles, as the device wants (the conftest models have head_dim 16)
COMMON = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
              max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
              pad_token_id=1, torch_dtype="bfloat16")
MODELS = {
    "llama-gqa": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2-bias": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
}


def assert_close_as_bf16(got: torch.Tensor, expected: torch.Tensor, bf16: torch.Tensor) -> None:
    """`got` (bf16 on the device) is as close to the float32 torch runner as the torch runner in bfloat16 is."""
    bf16_error = (bf16 - expected).abs().max()
    assert (got - expected).abs().max() <= 2 * bf16_error + 1e-3, (float((got - expected).abs().max()), float(bf16_error))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for seed, (name, make) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        directory = tmp_path_factory.mktemp(name)
        make().to(torch.bfloat16).save_pretrained(directory)
        out[name] = directory
    return out


def ttnn_runner(directory: Path, *, chips: int = 1, **kwargs) -> TtnnRunner:
    config, hf = read_config(directory), read_hf_weights(directory)
    return TtnnRunner.from_hf_weights(config, hf, ttnn=Standin(chips), device=Device(chips), n_devices=chips, **kwargs)


def ids(count: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(2, vocab, (count,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_decode_and_verify_match_the_torch_runner(models, name):
    tokens = ids(100, 1)
    expected = ModelRunner.from_checkpoint(models[name]).forward(tokens, 0)
    bf16 = ModelRunner.from_checkpoint(models[name], dtype="bfloat16").forward(tokens, 0)
    runner = ttnn_runner(models[name])
    pieces = [runner.forward(tokens[:40], 0)]  # prefill: an eager 64-position window
    pieces += [runner.forward(tokens[i : i + 1], i) for i in range(40, 70)]  # decode, across a tile boundary at 64
    pieces.append(runner.forward(tokens[70:76], 70))  # a 6-token verification inside one tile: replayed
    pieces.append(runner.forward(tokens[76:100], list(range(76, 100))))  # one that spans two tiles: eager
    got = torch.cat(pieces)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert_close_as_bf16(got, expected, bf16)
    # position 40 warms up (eager), 41 captures the window at 32, 64 recaptures; 76..99 spans two tiles
    assert (len(runner.timings.replays), len(runner.timings.captures), len(runner.timings.eager)) == (30, 2, 2)
    assert runner.timings.warmup_s > 0


def test_bfloat8_weights_stay_close(models):
    tokens = ids(40, 2)
    expected = ModelRunner.from_checkpoint(models["llama-gqa"]).forward(tokens, 0)
    bf16, bfp8 = (ttnn_runner(models["llama-gqa"], dtype=dtype).forward(tokens, 0) for dtype in ("bfloat16", "bfloat8_b"))
    error, bf16_error = (bfp8 - expected).abs().max(), (bf16 - expected).abs().max()
    assert bf16_error < error < 0.15 * expected.abs().max()  # 7-bit mantissas: coarser than bf16, still close
    assert (bfp8.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_trace_replay_equals_eager(models):
    tokens = ids(80, 3)
    eager, traced = (ttnn_runner(models["llama-gqa"], use_trace=use) for use in (False, True))
    for runner in (eager, traced):
        runner.forward(tokens[:10], 0)
    for i in range(10, 80):
        assert torch.equal(traced.forward(tokens[i : i + 1], i), eager.forward(tokens[i : i + 1], i))
    assert traced.ttnn.calls["execute_trace"] == len(traced.timings.replays) > 60
    assert "execute_trace" not in eager.ttnn.calls


def test_64_greedy_tokens_equal_the_torch_runner():
    prompt = load_tokenizer(TARGET_DIR)("def fibonacci(n):\n", add_special_tokens=False)["input_ids"]
    outputs = []
    for runner in (ModelRunner.from_checkpoint(TARGET_DIR, max_seq_len=128),
                   TtnnRunner.from_hf_weights(read_config(TARGET_DIR), read_hf_weights(TARGET_DIR), ttnn=Standin(),
                                              device=Device(), max_seq_len=128)):
        logits, generated = runner.forward(prompt, 0), []
        for position in range(len(prompt), len(prompt) + 64):
            generated.append(int(logits[-1].argmax()))
            logits = runner.forward(generated[-1:], position)
        outputs.append(generated)
    assert outputs[0] == outputs[1]


def test_rollback_then_redecode_equals_no_detour(models):
    tokens = ids(30, 4)
    straight = ttnn_runner(models["llama-gqa"])
    straight.forward(tokens[:20], 0)
    expected = straight.forward(tokens[20:], 20)

    runner = ttnn_runner(models["llama-gqa"])
    runner.forward(tokens[:20], 0)
    runner.forward(torch.tensor([5, 6, 7, 8, 9, 10, 11]), 20)  # a rejected draft window
    cache = runner.model.k_cache[0][0]
    before = [shard.clone() for shard in cache.shards]
    runner.truncate(0, 20)
    assert runner.lengths[0] == 20
    assert all(torch.equal(a, b) for a, b in zip(cache.shards, before))  # O(1): nothing on the device touched
    assert torch.equal(runner.forward(tokens[20:], 20), expected)


def test_slots_are_independent(models):
    a, b = ids(40, 5), ids(40, 6)
    runner = ttnn_runner(models["qwen2-bias"], n_slots=2)
    slot_a, slot_b = runner.allocate_slot(), runner.allocate_slot()
    outs = {slot_a: [], slot_b: []}
    for start in range(0, 40, 5):  # interleaved, each slot with its own trace
        outs[slot_a].append(runner.forward(a[start : start + 5], start, slot_a))
        outs[slot_b].append(runner.forward(b[start : start + 5], start, slot_b))
    for slot, tokens in ((slot_a, a), (slot_b, b)):
        alone = ttnn_runner(models["qwen2-bias"]).forward(tokens, 0)
        assert (torch.cat(outs[slot]) - alone).abs().max() < 1e-2


def test_two_chip_mesh_is_as_close_as_one_chip(models):
    tokens = ids(50, 7)
    expected = ModelRunner.from_checkpoint(models["llama-gqa"]).forward(tokens, 0)[33:]
    bf16 = ModelRunner.from_checkpoint(models["llama-gqa"], dtype="bfloat16").forward(tokens, 0)[33:]
    for chips in (1, 2):
        runner = ttnn_runner(models["llama-gqa"], chips=chips)
        runner.forward(tokens[:33], 0)
        got = torch.cat([runner.forward(tokens[i : i + 1], i) for i in range(33, 50)])
        assert_close_as_bf16(got, expected, bf16)  # tensor-parallel: the same sums in another order
    assert runner.ttnn.calls["all_reduce"] > 0 and len(runner.model.k_cache[0][0].shards) == 2
    assert runner.model.k_cache[0][0].shards[0].shape[1] == 1  # each chip holds one of the two KV heads


def test_fused_qkv_puts_whole_heads_on_each_chip(models):
    config, hf = read_config(models["llama-gqa"]), read_hf_weights(models["llama-gqa"])
    qkv = host_weights(config, hf, 2)["layers.0.wqkv"].tensor[0, 0]  # [in, 2 chips x (2 q + 1 k + 1 v heads) x 64]
    q, k, v = (hf[f"model.layers.0.self_attn.{p}_proj.weight"].t() for p in "qkv")
    chip1 = qkv[:, 256:]
    assert torch.equal(chip1[:, :128], q[:, 128:]) and torch.equal(chip1[:, 128:192], k[:, 64:])
    assert torch.equal(chip1[:, 192:], v[:, 64:])


def test_errors_say_what_to_change(models, checkpoints):
    runner = ttnn_runner(models["llama-gqa"], max_seq_len=64)
    runner.forward(ids(10, 8), 0)
    with pytest.raises(CacheCapacityError, match="gap"):
        runner.forward([3], 12)
    with pytest.raises(CacheCapacityError, match="beyond the KV cache"):
        runner.forward(ids(60, 9), 10)
    with pytest.raises(UnsupportedModelError, match="head_dim"):
        ttnn_runner(checkpoints["llama-tied"][0])  # head_dim 16: not a whole tile
    with pytest.raises(UnsupportedModelError, match="mesh"):
        ttnn_runner(models["llama-gqa"], chips=4)  # 2 KV heads over 4 chips


def speculate(mode: str, k: int, ttnn_draft: bool = False, draft_first: bool = False) -> list[list[int]]:
    """Greedy tokens for two held-out prompts, the target a ttnn runner (on the stand-in), the draft torch
    or ttnn; `draft_first`: drafting ahead finishes while the target verifies (it gets VerifyNext)."""
    tokenizer = load_tokenizer(TARGET_DIR)
    prompts = [json.loads(line) for line in Path(HELDOUT_PROMPTS).read_text().splitlines()[:2]]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"][-48:] for text in prompts]
    target = TtnnRunner.from_hf_weights(read_config(TARGET_DIR), read_hf_weights(TARGET_DIR), ttnn=Standin(),
                                        device=Device(), max_seq_len=160, n_slots=2)
    if ttnn_draft:  # no scratch rows: overlap's branches are drafted one after another
        draft = TtnnRunner.from_hf_weights(read_config(DRAFT_DIR), read_hf_weights(DRAFT_DIR), ttnn=Standin(),
                                           device=Device(), max_seq_len=160, n_slots=2)
    else:
        draft = ModelRunner.from_checkpoint(DRAFT_DIR, max_seq_len=160, n_slots=2)
    limits = ModelLimits(target.config.vocab_size, frozenset(target.config.eos_token_ids), 160)
    transport = LocalTransport(None if mode == "target-only" else draft, target, draft_first=draft_first,
                               one_at_a_time=draft_first)
    sequences, _ = generate(transport, prompt_ids, DecodeConfig(mode, k, 40, k_policy="fixed"), limits, concurrency=2)
    assert target.free_slot_count == 2
    return [sequence.generated for sequence in sequences]


@pytest.fixture(scope="module")
def target_only() -> list[list[int]]:
    return speculate("target-only", 1)


@pytest.mark.slow
@pytest.mark.parametrize("mode,k", [("serial", 3), ("overlap", 3), ("overlap", 5)])
def test_speculative_greedy_with_a_ttnn_target_equals_target_only(target_only, mode, k):
    assert speculate(mode, k) == target_only


@pytest.mark.slow
def test_overlap_with_a_ttnn_draft_and_chained_verification_equals_target_only(target_only):
    assert speculate("overlap", 3, ttnn_draft=True, draft_first=True) == target_only


def test_a_worker_loads_the_ttnn_runner_and_reports_its_timings_apart(monkeypatch):
    """`specpipe worker --backend ttnn` as far as it goes without a chip: server.load on the stand-in."""
    from workers import server
    from workers.model import ttnn_runner
    from workers.worker_settings import WorkerSettings

    chip = Standin(chips=1)
    monkeypatch.setattr(ttnn_runner, "check_chips_present", lambda device: None)
    monkeypatch.setattr(ttnn_runner, "import_ttnn", lambda: chip)
    monkeypatch.setattr(ttnn_runner, "isolate_process", lambda device, role: None)
    lines: list[str] = []
    monkeypatch.setattr(server, "log", lambda role, text: lines.append(f"[{role}] {text}"))
    spec = WorkerSettings("target", str(TARGET_DIR), bind="", backend="ttnn", device="cpu", dtype="fp16-weights",
                      slots=2, max_seq_len=128)
    service, ready = server.load(spec)
    runner = service.runner
    assert isinstance(runner, TtnnRunner) and ready.device == "tt:0" and runner.dtype == "bfloat16"
    runner.forward(list(range(5, 45)), 0)  # prefill positions 0..39
    for position in range(40, 45):  # 40 warms up, 41 captures, 41..44 replay
        runner.forward([7], position)
    runner.opened.close()
    assert runner.opened.handle.closed and not chip.traces  # traces released before the device closed
    log = "\n".join(lines)
    assert "[target] target on tt:0 (1 chip(s), bfloat16 weights)" in log
    assert "warm-up: first 32-position window" in log and "decode trace captured in" in log
    assert "steady state: 4 replayed window(s)" in log

    draft = WorkerSettings("draft", str(DRAFT_DIR), bind="", backend="ttnn", device="cpu", dtype="float32", slots=1)
    assert isinstance(server.load(draft)[0].runner, ModelRunner)  # a draft left on the CPU stays on torch
    assert not isinstance(server.load(draft)[0].runner, TtnnRunner)
