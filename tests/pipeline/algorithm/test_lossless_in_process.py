"""The decoding algorithm, all in one process: every mode emits the target's own greedy tokens.

The oracle is `pipeline.algorithm.reference`: the whole algorithm as one synchronous loop over the two runners,
no scheduler, no messages."""

import json

import pytest

from pipeline.algorithm.generation import ModelLimits, generate
from pipeline.algorithm.reference import reference_decode
from pipeline.config import DecodeConfig
from pipeline.runtime.in_process import LocalTransport
from workers.bundled import DRAFT_DIR, HELDOUT_PROMPTS, TARGET_DIR
from workers.model import ModelRunner
from workers.model.checkpoint import load_tokenizer
from workers.sampling import SamplingParams


@pytest.fixture(scope="module")
def pair():
    draft = ModelRunner.from_checkpoint(DRAFT_DIR, n_slots=4, max_seq_len=256)
    target = ModelRunner.from_checkpoint(TARGET_DIR, n_slots=4, max_seq_len=256)
    tokenizer = load_tokenizer(TARGET_DIR)
    texts = [json.loads(line) for line in HELDOUT_PROMPTS.read_text().splitlines()[:6]]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"][:60] for t in texts]
    limits = ModelLimits(target.config.vocab_size, frozenset(target.config.eos_token_ids), 256)
    return draft, target, prompts, limits


# How the two in-process workers take turns: the target answering first (the verification beats the
# drafting ahead), or the draft first with one reply at a time (drafting ahead finishes while the target
# still verifies, so the target gets a VerifyNext and goes on without the coordinator).
TIMINGS = {"target-first": {}, "draft-first": {"draft_first": True, "one_at_a_time": True}}


def run(pair, timing="target-first", **config):
    draft, target, prompts, limits = pair
    concurrency = config.pop("concurrency", 1)
    transport = LocalTransport(draft, target, **TIMINGS[timing])
    sequences, _ = generate(transport, prompts, DecodeConfig(**{"k_policy": "fixed", **config}), limits, concurrency)
    assert draft.free_slot_count == draft.n_slots and target.free_slot_count == target.n_slots  # all released
    return sequences


@pytest.fixture(scope="module")
def baseline(pair):
    """The target's own greedy tokens, from the reference loop."""
    draft, target, prompts, limits = pair
    config = DecodeConfig(mode="target-only", max_new_tokens=40)
    return [reference_decode(target, None, prompt, config, limits.eos_ids) for prompt in prompts]


@pytest.mark.parametrize("k", [1, 4])
def test_the_reference_loop_is_lossless_itself(pair, baseline, k):
    draft, target, prompts, limits = pair
    speculative = DecodeConfig(mode="serial", k=k, max_new_tokens=40, k_policy="fixed")
    assert [reference_decode(target, draft, p, speculative, limits.eos_ids) for p in prompts] == baseline
    # sampling from top-1 is greedy: the rejection rule must then keep exactly the greedy tokens
    top1 = DecodeConfig(mode="serial", k=k, max_new_tokens=40, k_policy="fixed", sampling=SamplingParams(1.0, top_k=1, seed=3))
    assert reference_decode(target, draft, prompts[0], top1, limits.eos_ids) == baseline[0]
    assert draft.free_slot_count == draft.n_slots and target.free_slot_count == target.n_slots


def test_target_only_through_the_pipeline_equals_the_reference(pair, baseline):
    assert [s.generated for s in run(pair, mode="target-only", max_new_tokens=40)] == baseline


@pytest.mark.parametrize("mode, timing", [("serial", "target-first"), ("overlap", "target-first"),
                                          ("overlap", "draft-first")])
@pytest.mark.parametrize("k, concurrency", [(1, 1), (3, 4), (8, 2)])
def test_greedy_tokens_equal_target_only(pair, baseline, mode, timing, k, concurrency):
    sequences = run(pair, timing, mode=mode, k=k, max_new_tokens=40, concurrency=concurrency)
    assert [s.generated for s in sequences] == baseline
    for s in sequences:
        assert len(s.generated) == 40 and s.finish_reason == "length"
        assert s.stats.accepted <= s.stats.drafted
        assert all(n <= w for n, w in zip(s.stats.accepted_lengths, s.stats.window_sizes))
        assert max(s.stats.window_sizes) <= k


@pytest.mark.parametrize("mode", ["serial", "overlap"])
def test_adaptive_window_stays_lossless_and_adapts(pair, baseline, mode):
    sequences = run(pair, mode=mode, k=8, max_new_tokens=40, k_policy="adaptive", concurrency=2)
    assert [s.generated for s in sequences] == baseline
    sizes = {size for s in sequences for size in s.stats.window_sizes}
    assert max(sizes) <= 8 and len(sizes) > 2  # it really moved


def test_overlap_uses_predrafts(pair):
    sequences = run(pair, mode="overlap", k=3, max_new_tokens=40)
    assert sum(s.stats.predraft_hits for s in sequences) > 0
    assert sum(s.stats.predraft_misses for s in sequences) > 0


def test_the_target_goes_on_by_itself_when_the_next_window_is_ready(pair, baseline):
    draft, target, prompts, limits = pair
    sequences, engine = generate(LocalTransport(draft, target, **TIMINGS["draft-first"]), prompts,
                                 DecodeConfig(mode="overlap", k=3, max_new_tokens=40, k_policy="fixed"), limits)
    assert [s.generated for s in sequences] == baseline
    chained = [trip for trip in engine.trips if trip.kind == "chained" and trip.rows]  # not all skipped
    verified = [trip for trip in engine.trips if trip.kind == "verify"]
    hits = sum(s.stats.predraft_hits for s in sequences)
    assert len(chained) == hits > len(verified) / 2  # every hit was verified without a coordinator hop


@pytest.mark.parametrize("timing", TIMINGS)
def test_eos_stops_the_sequence(pair, baseline, timing):
    draft, target, prompts, limits = pair
    eos_token = baseline[0][7]  # pretend the 8th greedy token of prompt 0 is end-of-sequence
    eos_limits = ModelLimits(limits.vocab_size, frozenset({eos_token}), limits.max_context)
    for mode in ("target-only", "serial", "overlap"):
        sequences, _ = generate(LocalTransport(draft, target, **TIMINGS[timing]), prompts[:1],
                                DecodeConfig(mode=mode, k=5, max_new_tokens=40, k_policy="fixed"), eos_limits)
        first = baseline[0].index(eos_token)
        assert sequences[0].generated == baseline[0][: first + 1]
        assert sequences[0].finish_reason == "eos"


@pytest.mark.parametrize("max_new_tokens", [1, 2, 6])
def test_k_larger_than_the_tokens_left(pair, baseline, max_new_tokens):
    sequences = run(pair, mode="overlap", k=8, max_new_tokens=max_new_tokens)
    assert [s.generated for s in sequences] == [b[:max_new_tokens] for b in baseline]


def test_prompt_that_fills_the_context(pair):
    draft, target, prompts, limits = pair
    long_prompt = (prompts[0] * 10)[: limits.max_context - 3]  # room for 3 new tokens only
    for mode in ("target-only", "overlap"):
        sequences, _ = generate(LocalTransport(draft, target), [long_prompt],
                                DecodeConfig(mode=mode, k=5, max_new_tokens=40, k_policy="fixed"), limits)
        assert len(sequences[0].tokens) == limits.max_context
        assert sequences[0].finish_reason == "length"
    with pytest.raises(ValueError, match="does not fit the context"):
        generate(LocalTransport(draft, target), [prompts[0] * 10], DecodeConfig(), limits)


def test_common_prefix_agrees_with_the_definition():
    import random

    from pipeline.algorithm.sequence import common_prefix

    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.randint(0, 2) for _ in range(rng.randint(0, 40))]
        b = a[: rng.randint(0, len(a))] + [rng.randint(0, 2) for _ in range(rng.randint(0, 5))]
        expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == common_prefix(b, a) == expected


def test_position_keyed_sampling_gives_the_same_text_in_every_mode_window_and_batch(pair, baseline):
    # the same seed and prompt, the same tokens: whatever was drafted, how windows fell and what shared a batch
    draft, target, prompts, limits = pair
    sampling = SamplingParams(1.0, seed=11, reproducible=True)
    alone = [reference_decode(target, None, p, DecodeConfig(mode="target-only", max_new_tokens=40, sampling=sampling),
                              limits.eos_ids) for p in prompts]
    assert alone != baseline  # it samples
    accepted = 0
    for timing, config in (("target-first", {"mode": "overlap", "k": 3, "concurrency": 3}),
                           ("draft-first", {"mode": "overlap", "k": 4, "k_policy": "goodput", "concurrency": 2})):
        sequences = run(pair, timing, max_new_tokens=40, sampling=sampling, **config)
        assert [s.generated for s in sequences] == alone, config
        accepted += sum(s.stats.accepted for s in sequences)
    assert accepted > 0  # the draft's keyed picks agree with the target's
    other_seed = DecodeConfig(mode="serial", k=2, max_new_tokens=40,
                              sampling=SamplingParams(1.0, seed=12, reproducible=True))
    assert reference_decode(target, draft, prompts[0], other_seed, limits.eos_ids) != alone[0]
