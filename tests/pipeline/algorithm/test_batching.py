"""Continuous batching, in one process: whatever shares its batches, each sequence's greedy tokens are
exactly its tokens decoded alone by the target (the issue's "lossless under batching")."""

import json

import pytest

from pipeline.algorithm.generation import ModelLimits, generate
from pipeline.config import DecodeConfig
from pipeline.runtime.in_process import LocalTransport
from workers.bundled import DRAFT_DIR, HELDOUT_PROMPTS, TARGET_DIR
from workers.model import ModelRunner
from workers.model.checkpoint import load_tokenizer
from workers.protocol.messages import TargetBatch

SEQUENCES, CONTEXT, NEW_TOKENS, CHUNK = 16, 320, 24, 64


@pytest.fixture(scope="module")
def pair():
    draft = ModelRunner.from_checkpoint(DRAFT_DIR, n_slots=SEQUENCES, max_seq_len=CONTEXT)
    target = ModelRunner.from_checkpoint(TARGET_DIR, n_slots=SEQUENCES, max_seq_len=CONTEXT)
    tokenizer = load_tokenizer(TARGET_DIR)
    texts = [json.loads(line) for line in HELDOUT_PROMPTS.read_text().splitlines()]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    # lengths from 9 to 200 tokens, from different places of the held-out code: short prompts beside ones
    # prefilled in 2 to 4 chunks
    code = [token for prompt in ids for token in prompt]
    prompts = [code[i * 97 : i * 97 + 9 + (i * 61) % 192] for i in range(SEQUENCES)]
    assert sum(len(p) > 2 * CHUNK for p in prompts) >= 3
    limits = ModelLimits(target.config.vocab_size, frozenset(target.config.eos_token_ids), CONTEXT)
    return draft, target, prompts, limits


class Recording(LocalTransport):
    """LocalTransport that keeps every batch sent to the target."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.target_batches: list[TargetBatch] = []

    def submit(self, role: str, message: object) -> None:
        if isinstance(message, TargetBatch):
            self.target_batches.append(message)
        super().submit(role, message)


def run(pair, concurrency, timing=None, **decode):
    draft, target, prompts, limits = pair
    transport = Recording(None if decode.get("mode") == "target-only" else draft, target, **(timing or {}))
    config = DecodeConfig(**{"k_policy": "fixed", "max_new_tokens": NEW_TOKENS, "prefill_chunk": CHUNK, **decode})
    sequences, engine = generate(transport, prompts, config, limits, concurrency)
    assert target.free_slot_count == target.n_slots and draft.free_slot_count == draft.n_slots  # all released
    return sequences, engine, transport


@pytest.fixture(scope="module")
def alone(pair):
    """Each prompt decoded by the target alone, one at a time."""
    sequences, _, _ = run(pair, 1, mode="target-only")
    return [s.generated for s in sequences]


CONFIGS = {
    "target-only": dict(mode="target-only"),
    "serial k=3": dict(mode="serial", k=3),
    "overlap k=3": dict(mode="overlap", k=3),
    "overlap goodput": dict(mode="overlap", k=4, k_policy="goodput"),
}


@pytest.mark.parametrize("concurrency", [4, 16])
@pytest.mark.parametrize("config", CONFIGS)
def test_every_sequence_equals_its_target_alone_whatever_shares_its_batches(pair, alone, config, concurrency):
    sequences, engine, _ = run(pair, concurrency, **CONFIGS[config])
    assert [s.generated for s in sequences] == alone
    batched = [t for t in engine.trips if t.role == "target" and t.sequences > 1]
    # the windows really shared passes (serial splits the sequences into a drafting and a verifying group)
    assert max(t.sequences for t in batched) >= concurrency // 4
    if config != "target-only":
        assert max(t.sequences for t in engine.trips if t.role == "draft") > 1


def test_drafting_ahead_in_time_stays_lossless_and_never_splits_a_step(pair, alone):
    """Drafting ahead finishing first: with several sequences running, the hits wait for the step to come back
    rather than go on in a pass of their own behind it (VerifyNext chains only a lone sequence)."""
    sequences, engine, _ = run(pair, 16, dict(draft_first=True, one_at_a_time=True), mode="overlap", k=3)
    assert [s.generated for s in sequences] == alone
    assert sum(s.stats.predraft_hits for s in sequences) > 0
    assert not any(t.kind == "chained" for t in engine.trips)


def test_a_long_prompt_is_prefilled_a_chunk_per_step_beside_the_running_streams(pair, alone):
    sequences, _, transport = run(pair, 4, mode="target-only")
    assert [s.generated for s in sequences] == alone
    prompt_tokens = []
    for batch in transport.target_batches:
        chunks = [*batch.prefills, *(v for v in batch.verifies if v.prompt)]
        assert all(c.start % CHUNK == 0 for c in chunks)  # at multiples of the chunk: never batch-dependent
        prompt_tokens.append(sum(len(c.feed) for c in chunks))
        if any(not v.prompt for v in batch.verifies):  # running streams share the step
            assert prompt_tokens[-1] <= CHUNK
    assert max(prompt_tokens) <= CHUNK and sum(prompt_tokens) == sum(len(s.prompt) for s in sequences)
    assert any(batch.prefills and any(not v.prompt for v in batch.verifies) for batch in transport.target_batches)


def test_admission_is_bounded_by_max_seqs(pair, alone):
    sequences, engine, transport = run(pair, 16, mode="overlap", k=3, max_seqs=5)
    assert [s.generated for s in sequences] == alone
    assert max(t.sequences for t in engine.trips) <= 5
    # in order: a sequence starts only once all before it have
    started = [s.stats.started for s in sequences]
    assert started == sorted(started)
