"""The draft worker's algorithm: propose tokens for a sequence, process-agnostic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from workers.model.runner import ModelRunner
from workers.model.runner_base import RunnerBase
from workers.sampling import SamplingParams, probabilities, sample
from workers.slots import SequenceSlots


@dataclass
class Draft:
    tokens: list[int]
    probs: Tensor | None  # [len(tokens), V] the distributions they were drawn from; None when greedy
    alternatives: list[list[int]]  # per token, the draft's next choices there, likeliest first
    cached: int  # positions of the sequence now in the draft's KV cache


@dataclass
class Branches:
    """Windows drafted for several contexts at once (see DraftCore.speculate)."""

    heads: list[int]  # per branch, the token it starts from (given, or a guess at the target's bonus)
    tokens: list[list[int]]  # per branch, the tokens drafted after its head
    probs: Tensor | None  # [branches, count, V] when sampling
    alternatives: list[list[list[int]]]  # per branch and drafted token, the next choices there
    cached: int  # positions of the sequence the cache still holds (the shared context)


class DraftCore:
    def __init__(self, runner: RunnerBase) -> None:
        self.runner = runner
        self.slots = SequenceSlots(runner, role_salt=1)

    def draft(
        self,
        seq_id: int,
        start: int,
        feed: list[int],
        count: int,
        sampling: SamplingParams,
        alternatives: int = 1,
    ) -> Draft:
        """Rolls the sequence back to `start`, reads `feed`, then proposes up to `count` tokens.

        Each proposed token but the last is read back in, so the cache ends at
        start + len(feed) + len(tokens) - 1.
        """
        slot = self.slots.prepare(seq_id, start)
        logits = self.runner.forward(feed, start, slot, last=1, prompt_pass=start == 0)  # from 0: a prompt
        generator = None if sampling.greedy else self.slots.generator(seq_id, sampling.seed)
        tokens: list[int] = []
        others: list[list[int]] = []
        rows: list[Tensor] = []
        while True:
            ((token, row, next_choices),) = _pick(logits[-1:], sampling, generator, alternatives)
            tokens.append(token)
            others.append(next_choices)
            if row is not None:
                rows.append(row)
            if len(tokens) == count:
                break
            logits = self.runner.forward(tokens[-1:], self.runner.lengths[slot], slot)
        return Draft(tokens, torch.stack(rows) if rows else None, others, self.runner.lengths[slot])

    def speculate(
        self,
        seq_id: int,
        start: int,
        feed: list[int],
        forks: list[int],
        heads: list[int],
        bonus_guesses: int,
        count: int,
        sampling: SamplingParams,
        alternatives: int = 1,
    ) -> Branches:
        """Drafts `count` tokens for each of several contexts that share the sequence's cache.

        Rolls back to `start` and reads `feed`, so the cache holds the context C = cache[:start] + feed.
        Branch i continues C[:forks[i]] + [heads[i]] (a verification rejected at that position, corrected
        to heads[i]); `bonus_guesses` more branches continue all of C and the draft's own likeliest next
        tokens there (guesses at the target's bonus token). All branches advance together, one batched
        forward per drafted token, their keys and values written past C as scratch; afterwards the cache
        holds C again.
        """
        slot = self.slots.prepare(seq_id, start)
        logits = self.runner.forward(feed, start, slot, last=1, prompt_pass=start == 0)
        end = start + len(feed)
        if any(not 0 <= fork < end for fork in forks):
            raise ValueError(f"every fork must lie within the {end} positions read")
        forks = list(forks) + [end] * bonus_guesses
        heads = list(heads) + logits[-1].topk(bonus_guesses).indices.tolist()
        generator = None if sampling.greedy else self.slots.generator(seq_id, sampling.seed)
        if self.runner.scratch_rows and end + count * len(heads) <= self.runner.max_seq_len:
            drafted = self._branches_batched(slot, forks, heads, count, sampling, generator, alternatives)
            self.runner.truncate(slot, end)
        else:  # a runner without scratch rows (ttnn), or no room for them: one branch after another
            drafted = self._branches_one_by_one(slot, forks, heads, count, sampling, generator, alternatives)
        tokens, rows, others = drafted
        probs = torch.stack([torch.stack(r) for r in rows]) if rows[0] else None
        return Branches(heads, tokens, probs, others, self.runner.lengths[slot])

    def _branches_batched(self, slot, forks, heads, count, sampling, generator, alternatives):
        # Step d feeds every branch's latest token; branch b's d-th row goes to scratch index
        # L + d*B + b and sees the shared cache before its fork plus its own earlier scratch rows.
        runner = cast(ModelRunner, self.runner)  # speculate checked scratch_rows: only it has them
        B, L = len(heads), runner.lengths[slot]
        columns = torch.arange(L + count * B)
        visible = columns[None, :] < torch.tensor(forks)[:, None]  # [B, L + count*B]
        scratch = columns[None, :] - L
        visible |= (scratch >= 0) & (scratch % B == torch.arange(B)[:, None])  # own rows (later ones sliced off)
        tokens, rows, others = [[] for _ in heads], [[] for _ in heads], [[] for _ in heads]
        latest = list(heads)
        for d in range(count):
            write_at = L + d * B
            logits = runner.scratch_forward(latest, [fork + d for fork in forks], slot, write_at,
                                            visible[:, : write_at + B])
            for b, (token, row, next_choices) in enumerate(_pick(logits, sampling, generator, alternatives)):
                tokens[b].append(token)
                others[b].append(next_choices)
                if row is not None:
                    rows[b].append(row)
                latest[b] = token
        return tokens, rows, others

    def _branches_one_by_one(self, slot, forks, heads, count, sampling, generator, alternatives):
        # Latest fork first: drafting a branch overwrites the cache from its fork on, which no branch
        # taken after it (forking earlier) reads.
        order = sorted(range(len(heads)), key=lambda b: forks[b], reverse=True)
        tokens, rows, others = [[] for _ in heads], [[] for _ in heads], [[] for _ in heads]
        for b in order:
            self.runner.truncate(slot, forks[b])
            logits = self.runner.forward([heads[b]], forks[b], slot)
            for d in range(count):
                ((token, row, next_choices),) = _pick(logits[-1:], sampling, generator, alternatives)
                tokens[b].append(token)
                others[b].append(next_choices)
                if row is not None:
                    rows[b].append(row)
                if d + 1 < count:
                    logits = self.runner.forward([token], self.runner.lengths[slot], slot)
        self.runner.truncate(slot, min(forks))
        return tokens, rows, others

    def release(self, seq_id: int) -> None:
        self.slots.release(seq_id)


def _pick(logits: Tensor, sampling: SamplingParams, generator: torch.Generator | None,
          alternatives: int) -> list[tuple[int, Tensor | None, list[int]]]:
    """Per row of logits [R, V]: the chosen token (argmax, or drawn), the distribution it was drawn
    from (sampling only) and the `alternatives` likeliest other tokens, likeliest first."""
    top = logits.topk(min(alternatives + 1, logits.shape[-1]), dim=-1).indices.tolist()
    if sampling.greedy:
        return [(row[0], None, row[1:]) for row in top]
    probs = probabilities(logits, sampling)
    picked = []
    for r, row in enumerate(top):
        token = sample(probs[r], generator)
        picked.append((token, probs[r], [t for t in row if t != token][:alternatives]))
    return picked
