"""The draft worker's algorithm: propose tokens for many sequences at once, process-agnostic.

A batch advances every sequence in it by one drafted token per forward pass (continuous batching);
a speculation's branches (pipeline.algorithm.drafting) are scratch rows of the same passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from workers.errors import SpecpipeError
from workers.model.runner_base import RunnerBase
from workers.model.segment import Segment
from workers.sampling import SamplingParams, keyed_pick, probabilities, sample
from workers.sequence_slots import SequenceSlots


@dataclass(frozen=True)
class DraftJob:
    """Roll the sequence back to `start`, read `feed`, then propose up to `count` tokens."""

    seq_id: int
    start: int
    feed: list[int]
    count: int
    sampling: SamplingParams = SamplingParams()
    alternatives: int = 1


@dataclass(frozen=True)
class SpeculateJob:
    """As DraftJob, then `count` tokens for each of several contexts sharing the sequence's cache: the
    context C = cache[:start] + feed cut at forks[i] and continued by heads[i], and `bonus_guesses` more
    continuing all of C with the draft's own likeliest next tokens (guesses at the target's bonus)."""

    seq_id: int
    start: int
    feed: list[int]
    forks: list[int]
    heads: list[int]
    bonus_guesses: int
    count: int
    sampling: SamplingParams = SamplingParams()
    alternatives: int = 1


@dataclass
class Draft:
    tokens: list[int]
    probs: Tensor | None  # [len(tokens), V] the distributions they were drawn from; None when greedy
    alternatives: list[list[int]]  # per token, the draft's next choices there, likeliest first
    cached: int  # positions of the sequence now in the draft's KV cache


@dataclass
class Branches:
    """Windows drafted for several contexts at once (see SpeculateJob)."""

    heads: list[int]  # per branch, the token it starts from (given, or a guess at the target's bonus)
    tokens: list[list[int]]  # per branch, the tokens drafted after its head
    probs: Tensor | None  # [branches, count, V] when sampling
    alternatives: list[list[list[int]]]  # per branch and drafted token, the next choices there
    cached: int  # positions of the sequence the cache still holds (the shared context)


@dataclass
class DraftBatchOutcome:
    drafted: list[Draft | Exception]  # per DraftJob, in order: its Draft, or what failed it alone
    speculated: list[Branches | Exception]
    rows: int = 0  # rows of every forward pass
    steps: int = 0  # forward passes


@dataclass
class _Lane:
    """One job in flight through the batch's passes: what it still needs and what it has drawn."""

    slot: int
    job: DraftJob | SpeculateJob
    generator: torch.Generator | None
    passes: int = 0  # passes after the first still to make
    forks: list[int] = field(default_factory=list)  # speculation: per branch
    heads: list[int] = field(default_factory=list)
    visible: Tensor | None = None  # speculation: [B, L + count*B] which cache indices each branch sees
    end: int = 0  # speculation: the shared context's length
    tokens: list[list[int]] = field(default_factory=list)  # per branch (one for a DraftJob)
    rows: list[list[Tensor]] = field(default_factory=list)
    others: list[list[list[int]]] = field(default_factory=list)

    def next_positions(self) -> list[int]:
        """Where the tokens drafted next go, per branch: a DraftJob's after its cache, a branch's after its
        head (which sits at its fork)."""
        if isinstance(self.job, DraftJob):
            return [self.job.start + len(self.job.feed) + len(self.tokens[0])]
        return [fork + 1 + len(tokens) for fork, tokens in zip(self.forks, self.tokens)]

    def take(self, picked: list[tuple[int, Tensor | None, list[int]]]) -> None:
        for b, (token, row, next_choices) in enumerate(picked):
            self.tokens[b].append(token)
            self.others[b].append(next_choices)
            if row is not None:
                self.rows[b].append(row)


class DraftCore:
    def __init__(self, runner: RunnerBase) -> None:
        self.runner = runner
        self.slots = SequenceSlots(runner, role_salt=1)

    def draft(self, seq_id: int, start: int, feed: list[int], count: int, sampling: SamplingParams,
              alternatives: int = 1) -> Draft:
        """One DraftJob alone. Each proposed token but the last is read back in, so the cache ends at
        start + len(feed) + len(tokens) - 1."""
        (made,) = self.draft_batch([DraftJob(seq_id, start, feed, count, sampling, alternatives)], []).drafted
        if isinstance(made, Exception):
            raise made
        return made

    def speculate(self, seq_id: int, start: int, feed: list[int], forks: list[int], heads: list[int],
                  bonus_guesses: int, count: int, sampling: SamplingParams, alternatives: int = 1) -> Branches:
        """One SpeculateJob alone; afterwards the cache holds its shared context again."""
        job = SpeculateJob(seq_id, start, feed, forks, heads, bonus_guesses, count, sampling, alternatives)
        (made,) = self.draft_batch([], [job]).speculated
        if isinstance(made, Exception):
            raise made
        return made

    def draft_batch(self, drafts: list[DraftJob], speculations: list[SpeculateJob]) -> DraftBatchOutcome:
        """Every job in the same forward passes: the first reads each job's feed; each later one advances every
        DraftJob by its latest token and every speculation's branches by theirs, as scratch rows. A job's row
        comes out as it would in a pass of its own, so a sequence's draft does not depend on its batch."""
        outcome = DraftBatchOutcome([], [])
        jobs: list[DraftJob | SpeculateJob] = [*drafts, *speculations]
        results: list[Draft | Branches | Exception | None] = [None] * len(jobs)
        lanes: dict[int, _Lane] = {}  # job index -> lane
        segments: list[Segment] = []
        seen: set[int] = set()
        for i, job in enumerate(jobs):
            try:
                if job.seq_id in seen:
                    raise ValueError(f"sequence {job.seq_id} appears twice in one draft batch")
                seen.add(job.seq_id)
                slot = self.slots.prepare(job.seq_id, job.start)
                tokens, start = self.runner.check_forward(job.feed, job.start, slot, None)
                if isinstance(job, SpeculateJob) and any(not 0 <= f < start + len(job.feed) for f in job.forks):
                    raise ValueError(f"every fork must lie within the {start + len(job.feed)} positions read")
            except (ValueError, SpecpipeError) as error:  # this item's alone
                results[i] = error
                continue
            generator = None if job.sampling.greedy else self.slots.generator(job.seq_id, job.sampling.seed)
            lanes[i] = _Lane(slot, job, generator)
            segments.append(Segment(slot, tokens, start, prompt_pass=start == 0))  # from 0: a prompt
        if segments:
            self._first_pass(lanes, segments, outcome)
        while any(lane.passes for lane in lanes.values()):
            self._next_pass(lanes, outcome)
        for i, lane in lanes.items():
            results[i] = self._finished(lane)
        outcome.drafted = results[: len(drafts)]  # type: ignore[assignment]
        outcome.speculated = results[len(drafts) :]  # type: ignore[assignment]
        return outcome

    def _first_pass(self, lanes: dict[int, _Lane], segments: list[Segment], outcome: DraftBatchOutcome) -> None:
        outcome.rows += sum(segment.rows for segment in segments)
        outcome.steps += 1
        for lane, logits in zip(list(lanes.values()), self.runner.forward_batch(segments)):
            job = lane.job
            if isinstance(job, DraftJob):
                lane.tokens, lane.rows, lane.others = [[]], [[]], [[]]
                lane.take(_pick(logits[-1:], job.sampling, lane.generator, job.alternatives, lane.next_positions()))
                lane.passes = job.count - 1
                continue
            lane.end = self.runner.lengths[lane.slot]
            lane.forks = list(job.forks) + [lane.end] * job.bonus_guesses
            lane.heads = list(job.heads) + logits[-1].topk(job.bonus_guesses).indices.tolist()
            branches = len(lane.heads)
            lane.tokens, lane.rows, lane.others = ([[] for _ in range(branches)] for _ in range(3))
            if self.runner.scratch_rows and lane.end + job.count * branches <= self.runner.max_seq_len:
                # Branch b's d-th row goes to scratch index L + d*B + b and sees the shared cache before its
                # fork plus its own earlier scratch rows.
                columns = torch.arange(lane.end + job.count * branches)
                visible = columns[None, :] < torch.tensor(lane.forks)[:, None]  # [B, L + count*B]
                scratch = columns[None, :] - lane.end
                visible |= (scratch >= 0) & (scratch % branches == torch.arange(branches)[:, None])
                lane.visible, lane.passes = visible, job.count
            else:  # a runner without scratch rows (ttnn), or no room for them: one branch after another
                outcome.rows, outcome.steps = _one_by_one(self.runner, lane, outcome.rows, outcome.steps)

    def _next_pass(self, lanes: dict[int, _Lane], outcome: DraftBatchOutcome) -> None:
        stepping = [lane for lane in lanes.values() if lane.passes]
        segments = []
        for lane in stepping:
            if isinstance(lane.job, DraftJob):
                segments.append(Segment(lane.slot, torch.tensor(lane.tokens[0][-1:]), self.runner.lengths[lane.slot]))
                continue
            branches, d = len(lane.heads), len(lane.tokens[0])
            write_at = lane.end + d * branches
            latest = [tokens[-1] if tokens else head for tokens, head in zip(lane.tokens, lane.heads)]
            segments.append(Segment(lane.slot, torch.tensor(latest), write_at,
                                    torch.tensor([fork + d for fork in lane.forks]),
                                    lane.visible[:, : write_at + branches], logits=branches))
        outcome.rows += sum(segment.rows for segment in segments)
        outcome.steps += 1
        for lane, logits in zip(stepping, self.runner.forward_batch(segments)):
            lane.take(_pick(logits, lane.job.sampling, lane.generator, lane.job.alternatives, lane.next_positions()))
            lane.passes -= 1

    def _finished(self, lane: _Lane) -> Draft | Branches:
        if isinstance(lane.job, DraftJob):
            probs = torch.stack(lane.rows[0]) if lane.rows[0] else None
            return Draft(lane.tokens[0], probs, lane.others[0], self.runner.lengths[lane.slot])
        if lane.visible is not None:
            self.runner.truncate(lane.slot, lane.end)  # drop the scratch: the cache holds the shared context
        probs = torch.stack([torch.stack(rows) for rows in lane.rows]) if lane.rows[0] else None
        return Branches(lane.heads, lane.tokens, probs, lane.others, self.runner.lengths[lane.slot])

    def release(self, seq_id: int) -> None:
        self.slots.release(seq_id)


def _one_by_one(runner: RunnerBase, lane: _Lane, rows: int, steps: int) -> tuple[int, int]:
    """Drafts a speculation's branches one after another in its own slot; returns the rows and steps counted.

    Latest fork first: drafting a branch overwrites the cache from its fork on, which no branch taken after it
    (forking earlier) reads."""
    job = lane.job
    for b in sorted(range(len(lane.heads)), key=lambda b: lane.forks[b], reverse=True):
        runner.truncate(lane.slot, lane.forks[b])
        logits = runner.forward([lane.heads[b]], lane.forks[b], lane.slot)
        rows, steps = rows + 1, steps + 1
        for d in range(job.count):
            ((token, row, next_choices),) = _pick(logits[-1:], job.sampling, lane.generator, job.alternatives,
                                                  lane.next_positions()[b : b + 1])
            lane.tokens[b].append(token)
            lane.others[b].append(next_choices)
            if row is not None:
                lane.rows[b].append(row)
            if d + 1 < job.count:
                logits = runner.forward([token], runner.lengths[lane.slot], lane.slot)
                rows, steps = rows + 1, steps + 1
    runner.truncate(lane.slot, min(lane.forks))
    return rows, steps


def _pick(logits: Tensor, sampling: SamplingParams, generator: torch.Generator | None, alternatives: int,
          positions: list[int]) -> list[tuple[int, Tensor | None, list[int]]]:
    """Per row of logits [R, V], for the token at positions[r]: the chosen token (argmax, drawn, or picked by
    the position-keyed race), the distribution it was drawn from (rejection sampling only) and the
    `alternatives` likeliest other tokens, likeliest first."""
    top = logits.topk(min(alternatives + 1, logits.shape[-1]), dim=-1).indices.tolist()
    if sampling.greedy:
        return [(row[0], None, row[1:]) for row in top]
    probs = probabilities(logits, sampling)
    if sampling.reproducible:
        tokens = keyed_pick(probs, sampling.seed, positions)
        return [(token, None, [t for t in row if t != token][:alternatives]) for token, row in zip(tokens, top)]
    picked = []
    for r, row in enumerate(top):
        token = sample(probs[r], generator)
        picked.append((token, probs[r], [t for t in row if t != token][:alternatives]))
    return picked
