"""The coordinator's algorithm: which request each worker gets next, and what each reply means.

It knows nothing of processes, sockets or wire formats (vLLM's EngineCore split): `next_request(role)`
hands out work for a worker, `on_reply(reply)` takes a worker's answer. Each worker runs one request
at a time (the target may hold one VerifyNext queued behind it); the engine around this class moves
the messages. Every sequence moves through the phases of `pipeline.sequence.Phase`.

Modes:
  target-only  the target decodes one token per pass (the baseline, through the same worker);
  serial       draft k tokens, then verify them, then draft again;
  overlap      while the target verifies window i, the draft drafts window i+1 for the likeliest
               outcomes of that verification at once, in one batched request (`pipeline.drafting`).
               When the drafted-ahead windows arrive before the verification ends, they follow it
               to the target as a VerifyNext, and the target goes on with the one for the outcome it
               finds; otherwise the coordinator hands over the window for the outcome (a hit), or the
               draft drafts anew (a miss).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pipeline.config import DecodeConfig
from pipeline.drafting import (
    EMPTY,
    Branch,
    BranchBudget,
    Chain,
    DraftAhead,
    Drafted,
    Outcomes,
    Resolution,
    Verification,
    likeliest_outcomes,
    resolve,
)
from pipeline.sequence import Phase, Sequence
from workers.protocol.messages import (
    DraftRequest,
    DraftResult,
    Release,
    Skipped,
    SpeculateRequest,
    SpeculateResult,
    VerifyNext,
    VerifyRequest,
    VerifyResult,
)

ALTERNATIVES = 3  # runner-up tokens the draft reports per drafted token: the corrections overlap bets on


class Scheduler:
    def __init__(
        self,
        config: DecodeConfig,
        vocab_size: int,
        eos_ids: set[int],
        max_context: int,
        concurrency: int = 1,
        on_tokens: Callable[[Sequence, list[int]], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
        self.config = config
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.max_context = max_context
        self.concurrency = concurrency
        self.on_tokens = on_tokens
        self.clock = clock  # stamps the statistics (TTFT, token times)
        self.roles = config.roles  # the workers that hold its sequences' KV slots
        self.sequences: dict[int, Sequence] = {}  # admitted, in order of admission
        self.waiting: list[Sequence] = []  # not yet admitted: at most `concurrency` run at once
        self.control: dict[str, list[object]] = {"draft": [], "target": []}  # releases to send
        self.branch_budget = BranchBudget(config.max_branches)
        self._next_request_id = 0
        self._in_flight: dict[int, Sequence] = {}

    # --- admission ------------------------------------------------------------------------------

    def add(self, seq_id: int, prompt: list[int]) -> Sequence:
        if not prompt:
            raise ValueError("an empty prompt cannot be continued; give at least one token")
        if len(prompt) >= self.max_context:
            raise ValueError(
                f"prompt of {len(prompt)} tokens does not fit the context of {self.max_context} tokens "
                "(leave room for at least one new token)"
            )
        sequence = Sequence(seq_id, list(prompt), list(prompt), self.config.max_new_tokens, k=self.config.k)
        self.waiting.append(sequence)
        return sequence

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.concurrency:
            sequence = self.waiting.pop(0)
            sequence.stats.started = self.clock()
            sequence.phase, sequence.window = Phase.READY, EMPTY  # the prompt's prefill: a plain step
            self.sequences[sequence.seq_id] = sequence

    @property
    def done(self) -> bool:
        return (
            not self.waiting
            and not any(self.control.values())
            and all(s.phase is Phase.FINISHED for s in self.sequences.values())
            and not self._in_flight
        )

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self.sequences.values() if s.phase is not Phase.FINISHED]

    def cancel(self) -> list[int]:
        """Finishes every sequence as "cancelled" and forgets what is in flight; returns the admitted
        sequences' ids (each worker must free their slots)."""
        now = self.clock()
        for sequence in [*self.sequences.values(), *self.waiting]:
            if sequence.phase is not Phase.FINISHED:
                self._finish(sequence, "cancelled", now, release=False)
        self.waiting.clear()
        self.control = {"draft": [], "target": []}
        self._in_flight.clear()
        return list(self.sequences)

    # --- handing out work -----------------------------------------------------------------------

    def next_request(self, role: str, unanswered: int = 0) -> object | None:
        """The next request for a worker of `role` that has `unanswered` requests, or None if there is
        nothing useful to send it now. An idle worker gets anything; a verifying target only the
        VerifyNext that continues its verification."""
        if unanswered:
            return self._next_chained() if role == "target" and unanswered == 1 else None
        if self.control[role]:
            return self.control[role].pop(0)
        self._admit()
        return self._next_verify() if role == "target" else self._next_draft()

    def _window_budget(self, sequence: Sequence, context_len: int, emitted_before: int) -> int:
        """How many tokens a window for a context of `context_len` may draft."""
        remaining = sequence.max_new_tokens - emitted_before
        # prompt + output never exceed the context: a verification adds up to k + 1 tokens
        room = self.max_context - context_len - 1
        return max(0, min(sequence.k, remaining - 1, room))

    def _next_verify(self) -> VerifyRequest | None:
        sequence = next((s for s in self.active if s.phase is Phase.READY), None)
        if sequence is None:
            return None
        window, sequence.window = sequence.window, None
        start, feed = sequence.target_cache.feed(sequence.tokens)
        feed = feed + window.tokens
        sequence.target_cache.extend(window.tokens)  # trimmed to what was accepted on reply
        request = VerifyRequest(self._new_id(), sequence.seq_id, start, feed, len(window), window.probs,
                                self.config.sampling)
        sequence.phase, sequence.verification = Phase.VERIFYING, Verification(request.request_id, window)
        return self._issue(sequence, request)

    def _next_chained(self) -> VerifyNext | None:
        """While the target verifies a window whose outcomes were drafted ahead, sends it those windows,
        so that it goes on with the right one as soon as it knows the outcome (no coordinator hop)."""
        for sequence in self.active:
            ahead = sequence.verification.ahead if sequence.phase is Phase.VERIFYING else None
            if ahead is None or ahead.branches is None or ahead.chain is not None:
                continue
            windows = {}  # (accepted, next token) -> the branch drafted for that outcome, and its window
            committed = len(sequence.tokens)
            for branch in ahead.branches:
                new_tokens = branch.context[committed:]
                emitted = len(sequence.generated) + len(new_tokens)
                count = self._window_budget(sequence, len(branch.context), emitted)
                if count and emitted < sequence.max_new_tokens and not self.eos_ids.intersection(new_tokens):
                    windows[(len(new_tokens) - 1, new_tokens[-1])] = (branch, branch.drafted.head(count))
            if not windows:  # no outcome to go on from without the coordinator
                ahead.chain = Chain(None, {})
                continue
            sent = [window for _, window in windows.values()]
            probs = None if sent[0].probs is None else torch.cat([w.probs for w in sent])
            request = VerifyNext(self._new_id(), sequence.seq_id, sequence.verification.request_id,
                                 [a for a, _ in windows], [t for _, t in windows], [w.tokens for w in sent],
                                 probs, self.config.sampling)
            ahead.chain = Chain(request.request_id, windows)
            return self._issue(sequence, request)
        return None

    def _next_draft(self) -> DraftRequest | SpeculateRequest | None:
        # First, windows the target is waiting for; then drafting ahead behind running verifications.
        sequence = next((s for s in self.active if s.phase is Phase.DRAFT_NEEDED), None)
        if sequence is not None:
            return self._draft(sequence)
        if self.config.mode != "overlap":
            return None
        for sequence in self.active:
            if sequence.phase is Phase.VERIFYING and sequence.verification.ahead is None:
                request = self._draft_ahead(sequence)
                if request is not None:
                    return request
        return None

    def _draft(self, sequence: Sequence) -> DraftRequest:
        count = self._window_budget(sequence, len(sequence.tokens), len(sequence.generated))
        start, feed = sequence.draft_cache.feed(sequence.tokens)
        alternatives = ALTERNATIVES if self.config.mode == "overlap" else 0
        sequence.phase = Phase.DRAFTING
        return self._issue(sequence, DraftRequest(self._new_id(), sequence.seq_id, start, feed, count,
                                                  self.config.sampling, alternatives))

    def _draft_ahead(self, sequence: Sequence) -> SpeculateRequest | None:
        """Drafts ahead, in one request, for the likeliest outcomes of the verification in flight."""
        window = sequence.verification.window
        context = sequence.tokens + window.tokens
        count = self._window_budget(sequence, len(context) + 1, len(sequence.generated) + len(window) + 1)
        if not count or len(context) + count >= self.max_context:
            return None
        rejections, bonus_guesses = likeliest_outcomes(window, len(sequence.tokens), self.branch_budget.value)
        outcomes = Outcomes(context, [fork for fork, _ in rejections], [head for _, head in rejections],
                            bonus_guesses)
        start, feed = sequence.draft_cache.feed(context)
        request = SpeculateRequest(self._new_id(), sequence.seq_id, start, feed, outcomes.forks, outcomes.heads,
                                   bonus_guesses, count, self.config.sampling, ALTERNATIVES)
        sequence.verification.ahead = DraftAhead(request.request_id, outcomes)
        return self._issue(sequence, request)

    def _issue(self, sequence: Sequence, request):
        self._in_flight[request.request_id] = sequence
        return request

    def _new_id(self) -> int:
        self._next_request_id += 1
        return self._next_request_id

    # --- taking replies -------------------------------------------------------------------------

    def on_reply(self, reply: DraftResult | SpeculateResult | VerifyResult | Skipped) -> None:
        sequence = self._in_flight.pop(reply.request_id, None)
        if sequence is None:
            raise ValueError(f"reply to unknown request {reply.request_id}")
        if isinstance(reply, VerifyResult):
            self._on_verified(sequence, reply)
        elif isinstance(reply, DraftResult):
            self._on_drafted(sequence, reply)
        elif isinstance(reply, SpeculateResult):
            self._on_drafted_ahead(sequence, reply)
        # a Skipped VerifyNext: the verification before it was resolved as a miss already

    def _on_drafted(self, sequence: Sequence, reply: DraftResult) -> None:
        sequence.draft_cache.extend(reply.tokens[:-1])  # read back in, all but the last
        sequence.draft_cache.settle(reply.cached, sequence.seq_id)
        if sequence.phase is Phase.FINISHED:
            return
        self._check_probs(reply.probs, (len(reply.tokens), self.vocab_size))
        sequence.phase, sequence.window = Phase.READY, Drafted(reply.tokens, reply.probs, reply.alternatives)

    def _on_drafted_ahead(self, sequence: Sequence, reply: SpeculateResult) -> None:
        sequence.draft_cache.settle(reply.cached, sequence.seq_id)
        if sequence.phase is Phase.FINISHED:
            return
        ahead = sequence.verification.ahead
        ahead.branches = self._branches(ahead.outcomes, reply)
        if sequence.phase is Phase.AWAITING_AHEAD:  # the verification came back first
            self._after_verification(sequence)

    def _branches(self, outcomes: Outcomes, reply: SpeculateResult) -> list[Branch]:
        branches, count = len(reply.heads), len(reply.tokens[0]) if reply.tokens else 0
        if branches != outcomes.branches or any(len(t) != count for t in reply.tokens):
            raise RuntimeError(f"the draft answered a speculation on {outcomes.branches} outcomes with {branches} "
                               "branches")
        self._check_probs(reply.probs, (branches, count, self.vocab_size))
        drafted = []
        for i, head in enumerate(reply.heads):
            rejected = i < len(outcomes.forks)
            context = (outcomes.context[: outcomes.forks[i]] if rejected else outcomes.context) + [head]
            probs = None if reply.probs is None else reply.probs[i]
            drafted.append(Branch(context, Drafted(reply.tokens[i], probs, reply.alternatives[i]), rejected))
        return drafted

    def _check_probs(self, probs: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        if (probs is None) != self.config.sampling.greedy or (probs is not None and tuple(probs.shape) != shape):
            got = "none" if probs is None else "x".join(map(str, probs.shape))
            raise RuntimeError(f"the draft sent distributions of shape {got}; expected "
                               f"{'none (greedy)' if self.config.sampling.greedy else 'x'.join(map(str, shape))}")

    def _on_verified(self, sequence: Sequence, reply: VerifyResult) -> None:
        sequence.target_cache.settle(reply.cached, sequence.seq_id)
        if sequence.phase is Phase.FINISHED:
            return
        verification = sequence.verification
        if reply.request_id != verification.request_id:
            raise RuntimeError(f"sequence {sequence.seq_id}: verification {reply.request_id} came back while "
                               f"{verification.request_id} was expected")
        window = verification.window
        if window.tokens:
            stats = sequence.stats
            stats.verifications += 1
            stats.drafted += len(window)
            stats.accepted += reply.accepted
            stats.accepted_lengths.append(reply.accepted)
            stats.window_sizes.append(len(window))
            if self.config.adaptive_k:
                full = reply.accepted == len(window)
                sequence.k = min(self.config.k, sequence.k + 1) if full else max(1, reply.accepted + 1)
        self._commit(sequence, window.tokens[: reply.accepted] + [reply.next_token])
        if sequence.phase is Phase.FINISHED:
            return  # a VerifyNext sent behind it is skipped: its outcomes all go on
        if verification.ahead is not None:
            if verification.ahead.branches is None:
                self.branch_budget.outlasted()
            else:
                self.branch_budget.finished_in_time()
        self._after_verification(sequence)

    def _after_verification(self, sequence: Sequence) -> None:
        """The one place a verification's outcome decides the sequence's next phase."""
        verification = sequence.verification
        resolved = resolve(verification, sequence.tokens)
        if resolved.how is Resolution.PENDING:
            sequence.phase = Phase.AWAITING_AHEAD
            return
        stats = sequence.stats
        if resolved.how is not Resolution.NOT_DRAFTED_AHEAD:
            stats.speculated_branches.append(len(verification.ahead.branches))
            if resolved.how is Resolution.MISS:
                stats.predraft_misses += 1
            else:
                stats.predraft_hits += 1
                stats.alt_hits += resolved.branch.after_rejection
        if resolved.how is Resolution.CHAINED:  # the target is verifying the hit's window already
            sequence.phase = Phase.VERIFYING
            sequence.verification = Verification(verification.ahead.chain.request_id, resolved.window)
            sequence.target_cache.extend([sequence.tokens[-1], *resolved.window.tokens])  # trimmed on reply
            return
        sequence.verification = None
        count = self._window_budget(sequence, len(sequence.tokens), len(sequence.generated))
        if resolved.how is Resolution.HIT:
            sequence.phase, sequence.window = Phase.READY, resolved.branch.drafted.head(count)
        elif not self.config.uses_draft or count == 0:
            sequence.phase, sequence.window = Phase.READY, EMPTY  # a plain step: nothing worth drafting
        else:
            sequence.phase = Phase.DRAFT_NEEDED

    def _commit(self, sequence: Sequence, new_tokens: list[int]) -> None:
        now = self.clock()
        finish_reason = None
        for i, token in enumerate(new_tokens):
            if token in self.eos_ids:
                new_tokens, finish_reason = new_tokens[: i + 1], "eos"
                break
        sequence.tokens.extend(new_tokens)
        stats = sequence.stats
        if stats.first_token_at is None:
            stats.first_token_at = now
        stats.token_times.extend([now] * len(new_tokens))
        if finish_reason is None and (len(sequence.generated) >= sequence.max_new_tokens
                                      or len(sequence.tokens) >= self.max_context):
            finish_reason = "length"  # the tokens asked for, or the context is full
        if finish_reason is not None:
            self._finish(sequence, finish_reason, now)
        if self.on_tokens is not None:
            self.on_tokens(sequence, new_tokens)

    def _finish(self, sequence: Sequence, reason: str, now: float, release: bool = True) -> None:
        sequence.phase, sequence.finish_reason, sequence.stats.finished_at = Phase.FINISHED, reason, now
        sequence.window = sequence.verification = None
        if release:
            for role in self.roles:
                self.control[role].append(Release(sequence.seq_id))
