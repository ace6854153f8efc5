"""The target worker's algorithm: verify drafted windows, several sequences in one forward pass, process-agnostic."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from workers.errors import SpecpipeError
from workers.model.runner_base import RunnerBase
from workers.model.segment import Segment
from workers.sampling import SamplingParams, greedy_accept, keyed_accept, probabilities, rejection_accept
from workers.sequence_slots import SequenceSlots


@dataclass
class Verdict:
    accepted: int  # how many of the drafted tokens the target kept
    next_token: int  # the target's own token after them (correction or bonus)
    cached: int  # positions of the sequence now in the target's KV cache


@dataclass(frozen=True)
class Window:
    """What one sequence asks of a target pass: read `feed` at `start`; its last `drafted` tokens are the
    draft's proposal (0: a plain decode step). `prompt`: feed is a prompt chunk; `final`: it wants a verdict
    (every window but a prompt's chunks before its last)."""

    seq_id: int
    start: int
    feed: list[int]
    drafted: int = 0
    sampling: SamplingParams = SamplingParams()
    draft_probs: Tensor | None = None  # [drafted, vocab] when sampling
    prompt: bool = False
    final: bool = True


class TargetCore:
    def __init__(self, runner: RunnerBase) -> None:
        self.runner = runner
        self.slots = SequenceSlots(runner, role_salt=2)

    def verify(self, seq_id: int, start: int, feed: list[int], drafted: int, sampling: SamplingParams,
               draft_probs: Tensor | None = None, prompt: bool | None = None) -> Verdict:
        """One sequence's window alone (see `verify_batch`); `prompt` defaults to "a pass from position 0
        with nothing drafted"."""
        prompt = start == 0 and drafted == 0 if prompt is None else prompt
        (verdict,) = self.verify_batch([Window(seq_id, start, feed, drafted, sampling, draft_probs, prompt)])
        if isinstance(verdict, Exception):
            raise verdict
        return verdict

    def verify_batch(self, windows: list[Window]) -> list[Verdict | int | Exception]:
        """Every window in one forward pass; per window, in order: its Verdict, or for a prompt chunk that is
        not final the positions now cached, or the ValueError that failed that window alone.

        Rejected tokens are rolled back, so each cache ends just before its `next_token`."""
        results: list[Verdict | int | Exception | None] = [None] * len(windows)
        segments, taken, seen = [], [], set()
        for i, window in enumerate(windows):
            try:
                if window.seq_id in seen:
                    raise ValueError(f"sequence {window.seq_id} appears twice in one target batch")
                seen.add(window.seq_id)
                segments.append(self._segment(window))
                taken.append(i)
            except (ValueError, SpecpipeError) as error:  # this item's alone
                results[i] = error
        if segments:
            for i, segment, logits in zip(taken, segments, self.runner.forward_batch(segments)):
                results[i] = self._judge(windows[i], segment.slot, logits)
        return results  # type: ignore[return-value]

    def _segment(self, window: Window) -> Segment:
        if not 0 <= window.drafted < len(window.feed):
            raise ValueError(f"a window of {len(window.feed)} tokens cannot carry {window.drafted} drafted ones")
        if window.drafted and window.sampling.needs_draft_probs and (
                window.draft_probs is None
                or tuple(window.draft_probs.shape) != (window.drafted, self.runner.config.vocab_size)):
            raise ValueError(f"sampling needs the draft's distributions for all {window.drafted} drafted tokens")
        slot = self.slots.prepare(window.seq_id, window.start)
        # A prompt's chunks are what every mode sends alike, so only they may take a kernel whose rows depend on
        # how many it multiplies (the backend tiles them alike); a window's rows must match one-token steps.
        tokens, start = self.runner.check_forward(window.feed, window.start, slot, None)
        return Segment(slot, tokens, start, logits=window.drafted + 1 if window.final else 0, prompt_pass=window.prompt)

    def _judge(self, window: Window, slot: int, logits: Tensor) -> Verdict | int:
        if not window.final:
            return self.runner.lengths[slot]
        drafted = window.drafted
        proposal = window.feed[len(window.feed) - drafted :]
        if window.sampling.greedy:
            accepted, next_token = greedy_accept(logits, proposal)
        elif window.sampling.reproducible:  # logits row i is for the token at this position + i
            first_position = window.start + len(window.feed) - drafted
            accepted, next_token = keyed_accept(probabilities(logits, window.sampling), proposal,
                                                window.sampling.seed, first_position)
        else:
            generator = self.slots.generator(window.seq_id, window.sampling.seed)
            accepted, next_token = rejection_accept(probabilities(logits, window.sampling), proposal,
                                                    window.draft_probs, generator)
        cached = window.start + len(window.feed) - drafted + accepted
        self.runner.truncate(slot, cached)
        return Verdict(accepted, next_token, cached)

    def release(self, seq_id: int) -> None:
        self.slots.release(seq_id)
