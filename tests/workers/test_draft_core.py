"""Drafting ahead for several outcomes at once gives each branch exactly what drafting it alone would."""

import pytest
import torch

from workers.bundled import DRAFT_DIR
from workers.draft_core import DraftCore
from workers.model import ModelRunner
from workers.sampling import SamplingParams, probabilities

CONTEXT = [12, 873, 45, 9, 301, 77, 1024, 5, 66, 2048, 17, 3]
FORKS, HEADS = [8, 9, 11], [400, 401, 402]  # rejected at three positions, corrected to these tokens
COUNT = 4


@pytest.fixture
def draft():
    return ModelRunner.from_checkpoint(DRAFT_DIR, dtype="float32", n_slots=4, max_seq_len=128)


def alone(runner: ModelRunner, context: list[int], sampling: SamplingParams) -> tuple[list[int], torch.Tensor | None]:
    """The window one ordinary draft request makes for `context` (slot 1, a fresh sequence)."""
    core = DraftCore(runner)
    made = core.draft(1, 0, context, COUNT, sampling, alternatives=2)
    core.release(1)
    return made.tokens, made.probs


def speculate(runner: ModelRunner, sampling: SamplingParams, one_by_one: bool = False):
    core = DraftCore(runner)
    if one_by_one:  # as for a runner without scratch rows (the ttnn one)
        core.runner = _WithoutScratch(runner)
    core.draft(0, 0, CONTEXT[:6], 1, sampling)  # the cache holds part of the context already
    branches = core.speculate(0, 6, CONTEXT[6:], FORKS, HEADS, 2, COUNT, sampling, alternatives=2)
    return core, branches


class _WithoutScratch:
    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner

    scratch_rows = False

    def __getattr__(self, name):
        return getattr(self._runner, name)


def branch_contexts(branches) -> list[list[int]]:
    rejected = [CONTEXT[:fork] + [head] for fork, head in zip(FORKS, branches.heads)]
    return rejected + [CONTEXT + [head] for head in branches.heads[len(FORKS):]]


@pytest.mark.parametrize("one_by_one", [False, True], ids=["batched", "one-by-one"])
def test_greedy_branches_equal_drafting_each_alone(draft, one_by_one):
    core, branches = speculate(draft, SamplingParams(), one_by_one)
    assert branches.heads[: len(FORKS)] == HEADS and len(branches.heads) == len(FORKS) + 2
    slot = core.slots.prepare(0, 0)
    bonus = draft.forward(CONTEXT, 0, slot)[-1].topk(2).indices.tolist()
    assert branches.heads[len(FORKS):] == bonus  # the draft's own two likeliest next tokens
    for context, tokens, alternatives in zip(branch_contexts(branches), branches.tokens, branches.alternatives):
        assert tokens == alone(draft, context, SamplingParams())[0]
        assert len(alternatives) == COUNT and all(len(a) == 2 and t not in a for a, t in zip(alternatives, tokens))
    assert branches.probs is None


def test_sampled_branches_report_the_distributions_they_were_drawn_from(draft):
    sampling = SamplingParams(0.9, top_k=50, seed=3)
    _, branches = speculate(draft, sampling)
    assert branches.probs.shape == (len(branches.heads), COUNT, draft.config.vocab_size)
    for b, (context, tokens) in enumerate(zip(branch_contexts(branches), branches.tokens)):
        # the same distributions as drafting this branch's tokens alone, given the same context
        core = DraftCore(draft)
        logits = draft.forward(context + tokens[:-1], 0, core.slots.prepare(1, 0))[len(context) - 1 :]
        core.release(1)
        assert torch.allclose(branches.probs[b], probabilities(logits, sampling), atol=1e-5)
        assert all(branches.probs[b, d, token] > 0 for d, token in enumerate(tokens))  # drawn from them


def test_the_cache_holds_the_shared_context_afterwards(draft):
    core, branches = speculate(draft, SamplingParams())
    assert branches.cached == len(CONTEXT) and draft.lengths[core.slots.slot(0)] == len(CONTEXT)
    continued = core.draft(0, len(CONTEXT), [99], COUNT, SamplingParams())  # reads on after the context
    assert continued.tokens == alone(draft, CONTEXT + [99], SamplingParams())[0]


def test_one_by_one_keeps_only_what_no_branch_overwrote(draft):
    core, branches = speculate(draft, SamplingParams(), one_by_one=True)
    assert branches.cached == min(FORKS)  # the earliest fork: past it, branches wrote their own tokens
