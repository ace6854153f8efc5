"""Both runners refuse the same forwards with the same messages, and keep their slots alike (the ttnn runner
on the torch stand-in of ttnn)."""

from __future__ import annotations

import pytest
import torch

from tests.workers.model.ttnn_standin import Device, Standin
from workers.bundled import DRAFT_DIR
from workers.errors import CacheCapacityError
from workers.model import ModelRunner
from workers.model.checkpoint import read_config, read_hf_weights
from workers.model.runner_base import RunnerBase
from workers.model.ttnn_runner import TtnnRunner

CONTEXT = 64


@pytest.fixture(scope="module")
def weights():
    return read_config(DRAFT_DIR), read_hf_weights(DRAFT_DIR)


@pytest.fixture(params=["torch", "ttnn"])
def runner(request, weights) -> RunnerBase:
    config, hf = weights
    if request.param == "torch":
        return ModelRunner.from_hf_weights(config, hf, n_slots=2, max_seq_len=CONTEXT)
    return TtnnRunner.from_hf_weights(config, hf, ttnn=Standin(), device=Device(), n_slots=2, max_seq_len=CONTEXT)


REFUSED = [
    ("a gap", [7], 11, None, CacheCapacityError, "position 11 would leave a gap: slot 0 holds only 10 positions"),
    ("past the context", list(range(60)), 10, None, CacheCapacityError,
     "positions 10..69 are beyond the KV cache of 64 positions \\(the model's context\\)"),
    ("a negative position", [7], -1, None, ValueError, "positions must be non-negative, got -1"),
    ("positions not consecutive", [7, 8], [10, 12], None, ValueError, "positions must be consecutive"),
    ("fewer positions than tokens", [7, 8], [10], None, ValueError, "got 2 tokens but 1 positions"),
    ("no tokens", [], 10, None, ValueError, "tokens must be a non-empty 1-D sequence"),
    ("a token outside the vocabulary", [4096], 10, None, ValueError, "token ids must lie in \\[0, 4096\\)"),
    ("last beyond the tokens", [7, 8], 10, 3, ValueError, "last must be between 1 and the 2 tokens read, got 3"),
]


@pytest.mark.parametrize("tokens, positions, last, error, message", [case[1:] for case in REFUSED],
                         ids=[case[0] for case in REFUSED])
def test_a_forward_that_does_not_fit_is_refused_and_changes_nothing(runner, tokens, positions, last, error, message):
    runner.forward(list(range(10)), 0)
    with pytest.raises(error, match=message):
        runner.forward(tokens, positions, 0, last)
    assert runner.lengths[0] == 10


def test_a_slot_that_does_not_exist_is_refused(runner):
    with pytest.raises(CacheCapacityError, match="slot 2 does not exist \\(this runner has 2\\)"):
        runner.forward([7], 0, 2)


def test_rollback_and_slot_reuse(runner):
    slot = runner.allocate_slot()
    runner.forward(list(range(10)), 0, slot)
    runner.forward([3, 4], 6, slot)  # from before the length: overwrites, the length moves back to 8
    assert runner.lengths[slot] == 8
    with pytest.raises(CacheCapacityError, match=f"cannot truncate slot {slot} to 9: it holds 8 positions"):
        runner.truncate(slot, 9)
    runner.truncate(slot, 5)
    with pytest.raises(CacheCapacityError, match="would leave a gap"):
        runner.forward([7], 6, slot)
    runner.free_slot(slot)
    assert runner.free_slot_count == 2
    assert runner.allocate_slot() == slot and runner.lengths[slot] == 0


def test_only_the_torch_runner_has_scratch_rows(runner):
    assert runner.scratch_rows == isinstance(runner, ModelRunner) == hasattr(runner, "scratch_forward")


def test_the_ttnn_runner_takes_a_prompt_pass_as_any_other(weights):
    config, hf = weights
    tokens = torch.arange(5, 45)
    marked, plain = (TtnnRunner.from_hf_weights(config, hf, ttnn=Standin(), device=Device(), max_seq_len=CONTEXT)
                     for _ in range(2))
    assert torch.equal(marked.forward(tokens, 0, last=1, prompt_pass=True), plain.forward(tokens, 0, last=1))
    assert marked.lengths[0] == plain.lengths[0] == 40
