"""The target worker's algorithm: verify a drafted window in one forward pass, process-agnostic."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from workers.model.runner_base import RunnerBase
from workers.sampling import SamplingParams, greedy_accept, probabilities, rejection_accept
from workers.slots import SequenceSlots


@dataclass
class Verdict:
    accepted: int  # how many of the drafted tokens the target kept
    next_token: int  # the target's own token after them (correction or bonus)
    cached: int  # positions of the sequence now in the target's KV cache


class TargetCore:
    def __init__(self, runner: RunnerBase) -> None:
        self.runner = runner
        self.slots = SequenceSlots(runner, role_salt=2)

    def verify(
        self,
        seq_id: int,
        start: int,
        feed: list[int],
        drafted: int,
        sampling: SamplingParams,
        draft_probs: Tensor | None = None,
    ) -> Verdict:
        """Reads `feed` at `start` (its last `drafted` tokens are the draft's proposal) in one pass.

        With drafted == 0 this is a plain decode (or prefill) step. Rejected tokens are rolled
        back, so the cache ends just before `next_token`.
        """
        if not 0 <= drafted < len(feed):
            raise ValueError(f"a window of {len(feed)} tokens cannot carry {drafted} drafted ones")
        slot = self.slots.prepare(seq_id, start)
        # A prompt's prefill is the one pass every mode sends alike, so only it may take a kernel whose rows
        # depend on how many it multiplies; a window's rows must match target-only's one-token steps.
        prompt_pass = start == 0 and drafted == 0
        logits = self.runner.forward(feed, start, slot, last=drafted + 1, prompt_pass=prompt_pass)
        proposal = feed[len(feed) - drafted :]
        if sampling.greedy:
            accepted, next_token = greedy_accept(logits, proposal)
        else:
            if drafted and (draft_probs is None or draft_probs.shape != (drafted, logits.shape[-1])):
                raise ValueError(f"sampling needs the draft's distributions for all {drafted} drafted tokens")
            generator = self.slots.generator(seq_id, sampling.seed)
            accepted, next_token = rejection_accept(probabilities(logits, sampling), proposal, draft_probs, generator)
        cached = start + len(feed) - drafted + accepted
        self.runner.truncate(slot, cached)
        return Verdict(accepted, next_token, cached)

    def release(self, seq_id: int) -> None:
        self.slots.release(seq_id)
