"""The draft worker's algorithm: propose tokens for a sequence, process-agnostic."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workers.model.runner import ModelRunner
from workers.sampling import SamplingParams, probabilities, sample
from workers.slots import SequenceSlots


@dataclass
class Draft:
    tokens: list[int]
    probs: Tensor | None  # [len(tokens), V] the distributions they were drawn from; None when greedy
    runner_up: list[int]  # the next-best token at each position
    cached: int  # positions of the sequence now in the draft's KV cache


class DraftCore:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.slots = SequenceSlots(runner, role_salt=1)

    def draft(
        self,
        seq_id: int,
        start: int,
        feed: list[int],
        count: int,
        sampling: SamplingParams,
    ) -> Draft:
        """Rolls the sequence back to `start`, reads `feed`, then proposes up to `count` tokens.

        Each proposed token but the last is read back in, so the cache ends at
        start + len(feed) + len(tokens) - 1.
        """
        slot = self.slots.prepare(seq_id, start)
        logits = self.runner.forward(feed, start, slot, last=1)
        generator = None if sampling.greedy else self.slots.generator(seq_id, sampling.seed)
        tokens: list[int] = []
        runner_up: list[int] = []
        rows: list[Tensor] = []
        while True:
            top2 = logits[-1].topk(2).indices.tolist()
            if sampling.greedy:
                tokens.append(top2[0])
            else:
                probs = probabilities(logits, sampling)[-1]
                rows.append(probs)
                tokens.append(sample(probs, generator))
            runner_up.append(top2[1] if tokens[-1] == top2[0] else top2[0])
            if len(tokens) == count:
                break
            logits = self.runner.forward(tokens[-1:], self.runner.lengths[slot], slot)
        return Draft(tokens, torch.stack(rows) if rows else None, runner_up, self.runner.lengths[slot])

    def release(self, seq_id: int) -> None:
        self.slots.release(seq_id)
