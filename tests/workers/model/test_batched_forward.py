"""A batched pass gives every sequence exactly what a pass of its own gives it, whatever shares the batch."""

import pytest
import torch

from workers.backends.cpu_fp16 import fp16_weights_available
from workers.bundled import DRAFT_DIR, TARGET_DIR
from workers.model import ModelRunner
from workers.model.segment import Segment

DTYPES = ["float32"] + (["fp16-weights"] if fp16_weights_available() else [])


def ids(count: int, seed: int) -> list[int]:
    return torch.randint(0, 4096, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def appended(slot: int, tokens: list[int], start: int, logits: int = 1, prompt: bool = False) -> Segment:
    return Segment(slot, torch.tensor(tokens), start, logits=logits, prompt_pass=prompt)


def branches_segment(slot: int, length: int, heads: list[int], forks: list[int]) -> Segment:
    # one drafting step of len(heads) branches as scratch rows past the slot's length
    columns = torch.arange(length + len(heads))
    mask = columns[None, :] < torch.tensor(forks)[:, None]
    mask |= columns[None, :] - length == torch.arange(len(heads))[:, None]
    return Segment(slot, torch.tensor(heads), length, torch.tensor(forks), mask, logits=len(heads))


def fresh(directory, dtype: str, slots: int = 4) -> ModelRunner:
    return ModelRunner.from_checkpoint(directory, dtype=dtype, n_slots=slots, max_seq_len=512)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("directory", [TARGET_DIR, DRAFT_DIR], ids=["target", "draft"])
def test_each_segment_of_a_mixed_batch_is_bitwise_what_it_is_alone(directory, dtype):
    # Four sequences at different stages share one pass: a prompt chunk, a one-token decode step,
    # a 4-token verification window and three drafted-ahead branches (scratch rows).
    prompts = [ids(100, 1), ids(37, 2), ids(60, 3), ids(45, 4)]
    alone, batched = fresh(directory, dtype), fresh(directory, dtype)
    for runner in (alone, batched):
        for slot, prompt in enumerate(prompts[1:], start=1):
            runner.forward(prompt, 0, slot, last=1, prompt_pass=True)
    segments = [
        appended(0, prompts[0][:64], 0, logits=0, prompt=True),  # first chunk of a prompt: no logits wanted
        appended(1, ids(1, 5), 37),
        appended(2, ids(4, 6), 60, logits=4),
        branches_segment(3, 45, ids(3, 7), [45, 44, 40]),
    ]
    expected = [alone.forward_batch([segment])[0] for segment in segments]
    got = batched.forward_batch(segments)
    for want, have in zip(expected, got):
        assert torch.equal(want, have)
    assert list(batched.lengths) == list(alone.lengths) == [64, 38, 64, 45]  # scratch rows do not extend a slot
    # and what the caches hold is the same: the next step agrees bitwise too
    nxt = [appended(0, prompts[0][64:], 64, prompt=True), appended(1, ids(1, 8), 38), appended(2, ids(1, 9), 64)]
    for segment in nxt:
        assert torch.equal(alone.forward_batch([segment])[0], batched.forward_batch([segment])[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_decode_row_is_the_same_at_any_batch_size(dtype):
    # 1, 4 and 16 sequences decoding together: sequence 0's logits never move.
    runner = fresh(TARGET_DIR, dtype, slots=16)
    prompts = [ids(20 + 3 * i, 10 + i) for i in range(16)]
    for slot, prompt in enumerate(prompts):
        runner.forward(prompt, 0, slot, last=1)
    results = []
    for batch in (1, 4, 16):
        segments = [appended(slot, [7 + slot], len(prompts[slot])) for slot in range(batch)]
        results.append(runner.forward_batch(segments)[0])
        for slot in range(batch):
            runner.truncate(slot, len(prompts[slot]))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.skipif("fp16-weights" not in DTYPES, reason="fp16-weights needs specpipe's kernels (a C compiler) or fbgemm (AVX2)")
def test_a_prompt_chunk_takes_the_prefill_kernel_the_same_way_in_any_batch():
    # The bf16 prefill kernel's rows change with how many it multiplies; it only ever sees tiles of one size,
    # so a chunk beside other sequences' rows comes out as the chunk alone.
    prompt = ids(64, 20)
    alone, batched = fresh(TARGET_DIR, "fp16-weights"), fresh(TARGET_DIR, "fp16-weights")
    batched.forward(ids(30, 21), 0, 1, last=1)
    want = alone.forward_batch([appended(0, prompt, 0, logits=64, prompt=True)])[0]
    got = batched.forward_batch([appended(1, ids(1, 22), 30), appended(0, prompt, 0, logits=64, prompt=True)])[1]
    assert torch.equal(want, got)


def test_a_slot_appears_once_per_batch():
    runner = fresh(DRAFT_DIR, "float32")
    with pytest.raises(ValueError, match="a slot may appear once"):
        runner.forward_batch([appended(0, [1, 2], 0), appended(0, [3], 2)])
