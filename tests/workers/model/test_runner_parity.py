"""Our runner computes what transformers computes, at every position, in every way of feeding it."""

import pytest
import torch

from workers.model import ModelRunner

NAMES = ["llama3-gqa", "llama-tied", "qwen2", "mistral"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CUDA runs where a GPU is present


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_prefill_logits_match_transformers(checkpoints, name, device):
    directory, model = checkpoints[name]
    ids = torch.randint(0, 128, (48,), generator=torch.Generator().manual_seed(1))
    got = ModelRunner.from_checkpoint(directory, device=device).forward(ids, 0).cpu()
    assert torch.allclose(got, reference_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_decode_and_verify_are_one_call(checkpoints, name):
    directory, model = checkpoints[name]
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(2))
    runner = ModelRunner.from_checkpoint(directory)
    pieces = [runner.forward(ids[:10], 0)]  # prefill
    pieces += [runner.forward(ids[i : i + 1], i) for i in range(10, 30)]  # one-token decode
    pieces.append(runner.forward(ids[30:35], 30))  # a 5-token verification window
    pieces.append(runner.forward(ids[35:], list(range(35, 40))))  # positions given as a list
    assert torch.allclose(torch.cat(pieces), reference_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_64_greedy_tokens_equal_transformers_generate(checkpoints, name, device):
    directory, model = checkpoints[name]
    prompt = torch.randint(2, 128, (12,), generator=torch.Generator().manual_seed(3))
    # eos_token_id=None: generate neither stops at EOS nor (as min_new_tokens would) suppresses it
    expected = model.generate(prompt[None], attention_mask=torch.ones(1, 12, dtype=torch.long), do_sample=False,
                              max_new_tokens=64, eos_token_id=None, pad_token_id=1)[0, 12:].tolist()
    assert len(expected) == 64
    runner = ModelRunner.from_checkpoint(directory, device=device)
    logits, generated = runner.forward(prompt, 0), []
    for position in range(12, 12 + 64):
        generated.append(int(logits[-1].argmax()))
        logits = runner.forward(generated[-1:], position)
    assert generated == expected


def test_rollback_then_redecode_equals_no_detour(checkpoints):
    directory, _ = checkpoints["llama3-gqa"]
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(4))
    straight = ModelRunner.from_checkpoint(directory)
    straight.forward(ids[:20], 0)
    expected = straight.forward(ids[20:], 20)

    runner = ModelRunner.from_checkpoint(directory)
    runner.forward(ids[:20], 0)
    runner.forward(torch.tensor([5, 6, 7, 8, 9, 10, 11]), 20)  # a rejected draft window
    cache_before = runner.model.k_cache.clone()
    runner.truncate(0, 20)
    assert runner.lengths[0] == 20
    assert torch.equal(runner.model.k_cache, cache_before)  # O(1): nothing copied or cleared
    assert torch.equal(runner.forward(ids[20:], 20), expected)


def test_slots_are_independent(checkpoints):
    directory, model = checkpoints["llama-tied"]
    a = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(5))
    b = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(6))
    runner = ModelRunner.from_checkpoint(directory, n_slots=2)
    slot_a, slot_b = runner.allocate_slot(), runner.allocate_slot()
    outs = {slot_a: [], slot_b: []}
    for start in range(0, 20, 5):  # interleave the two sequences
        outs[slot_a].append(runner.forward(a[start : start + 5], start, slot_a))
        outs[slot_b].append(runner.forward(b[start : start + 5], start, slot_b))
    assert torch.allclose(torch.cat(outs[slot_a]), reference_logits(model, a), atol=1e-4, rtol=1e-4)
    assert torch.allclose(torch.cat(outs[slot_b]), reference_logits(model, b), atol=1e-4, rtol=1e-4)
    runner.free_slot(slot_a)
    assert runner.free_slot_count == 1 and runner.allocate_slot() == slot_a


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_runs_and_mostly_agrees(checkpoints, device):
    directory, model = checkpoints["llama3-gqa"]
    ids = torch.randint(0, 128, (32,), generator=torch.Generator().manual_seed(7))
    got = ModelRunner.from_checkpoint(directory, dtype="bfloat16", device=device).forward(ids, 0).cpu()
    expected = reference_logits(model, ids)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def test_fp16_weights_agree_with_float32(checkpoints):
    from workers.backends.cpu_fp16 import fp16_weights_available

    if not fp16_weights_available():
        pytest.skip("fp16-weights needs specpipe's kernels (a C compiler) or fbgemm (AVX2)")
    directory, model = checkpoints["qwen2"]  # biases travel with the packed matrices
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(8))
    runner = ModelRunner.from_checkpoint(directory, dtype="fp16-weights")
    got = torch.cat([runner.forward(ids[:30], 0), runner.forward(ids[30:], 30)])
    expected = reference_logits(model, ids)
    assert torch.allclose(got, expected, atol=3e-2)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95


def test_fp16_weights_long_prefill_agrees_with_float32():
    # A prompt of 32 tokens or more takes the prefill kernel (oneDNN on bf16 where the CPU multiplies bf16,
    # else MKL on fp32); on the bundled target's trained weights it stays within bf16's reach of float32.
    import json

    from workers.backends.cpu_fp16 import PackedFp16, fp16_weights_available
    from workers.bundled import HELDOUT_PROMPTS, TARGET_DIR
    from workers.model.checkpoint import load_tokenizer

    if not fp16_weights_available():
        pytest.skip("fp16-weights needs specpipe's kernels (a C compiler) or fbgemm (AVX2)")
    text = json.loads(HELDOUT_PROMPTS.read_text().splitlines()[0])
    ids = load_tokenizer(str(TARGET_DIR)).encode(text)
    assert len(ids) > 3 * PackedFp16.PREFILL_ROWS
    got = ModelRunner.from_checkpoint(TARGET_DIR, dtype="fp16-weights", max_seq_len=512).forward(ids, 0, prompt_pass=True)
    expected = ModelRunner.from_checkpoint(TARGET_DIR, dtype="float32", max_seq_len=512).forward(ids, 0, prompt_pass=True)
    assert (got - expected).abs().max() < 0.15  # logits' std is about 2.4
    assert got[-1].argmax() == expected[-1].argmax()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("dtype", ["float32", "fp16-weights"])
def test_logits_for_the_last_positions_only(checkpoints, dtype):
    from workers.backends.cpu_fp16 import fp16_weights_available

    if dtype == "fp16-weights" and not fp16_weights_available():
        pytest.skip("fp16-weights needs specpipe's kernels (a C compiler) or fbgemm (AVX2)")
    directory, _ = checkpoints["llama3-gqa"]
    ids = torch.randint(0, 128, (46,), generator=torch.Generator().manual_seed(9))
    full = ModelRunner.from_checkpoint(directory, dtype=dtype)
    tail = ModelRunner.from_checkpoint(directory, dtype=dtype)
    expected = torch.cat([full.forward(ids[:40], 0, prompt_pass=True), full.forward(ids[40:], 40)])
    got = torch.cat([tail.forward(ids[:40], 0, last=1, prompt_pass=True), tail.forward(ids[40:], 40, last=4)])
    assert got.shape == (5, expected.shape[-1]) and tail.lengths[0] == 46  # the cache took every token
    # fp16-weights: a 1-row LM head runs fbgemm on fp16, a 40-row one oneDNN on bf16 (or MKL on fp32 where
    # the CPU has no bf16 instructions; PackedFp16); these test weights are fp32, exact in neither
    atol = 1e-5 if dtype == "float32" else 3e-2
    assert torch.allclose(got, torch.cat([expected[39:40], expected[42:]]), atol=atol)
    with pytest.raises(ValueError, match="last must be between 1 and the 6 tokens"):
        tail.forward(ids[40:], 40, last=7)


def test_fp16_weights_window_of_any_length_matches_decoding_it_token_by_token():
    # Greedy identity across modes needs each row of a verification window to come out as target-only's
    # one-token decode of it. Only a prompt's chunk may take the prefill kernel, whose rows change with
    # their number (docs/notes.md). What is left, ~1e-5, is attention with a mask against without one
    # (a one-token step needs none), far below any argmax margin seen.
    from workers.backends.cpu_fp16 import PackedFp16, fp16_weights_available
    from workers.bundled import TARGET_DIR

    if not fp16_weights_available():
        pytest.skip("fp16-weights needs specpipe's kernels (a C compiler) or fbgemm (AVX2)")
    ids = torch.randint(0, 4096, (90,), generator=torch.Generator().manual_seed(11)).tolist()
    prompt, window = ids[:40], ids[40:]
    assert len(window) > PackedFp16.PREFILL_ROWS
    runner = ModelRunner.from_checkpoint(TARGET_DIR, dtype="fp16-weights", max_seq_len=128)
    runner.forward(prompt, 0, prompt_pass=True)
    together = runner.forward(window, len(prompt))
    runner.truncate(0, len(prompt))
    alone = torch.cat([runner.forward([token], len(prompt) + i) for i, token in enumerate(window)])
    assert (together - alone).abs().max() < 1e-4
    assert torch.equal(together.argmax(-1), alone.argmax(-1))
