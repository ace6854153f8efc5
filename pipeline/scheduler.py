"""The coordinator's algorithm: which request each worker gets next, and what each reply means.

It knows nothing of processes or sockets (vLLM's EngineCore split): `next_request(role)` hands out
work for an idle worker, `on_reply(reply)` takes a worker's answer. Each worker runs one request
at a time; the engine around this class moves the messages.

For every sequence the scheduler mirrors the token ids whose keys and values each worker holds
(`draft_view`, `target_view`), so every request says exactly where to roll back to and what to read.

Modes:
  target-only  the target decodes one token per pass (the baseline, through the same worker);
  serial       draft k tokens, then verify them, then draft again;
  overlap      while the target verifies window i, the draft drafts window i+1 for the likeliest
               outcomes of that verification at once, in one batched request (pre-speculating
               verification outcomes, as SSD/Saguaro do): "all accepted, and the target's bonus
               token is one of the draft's top guesses", and "rejected at position j, corrected to
               one of the draft's runner-up tokens there", for every j. How many branches fit is
               learnt as it runs: one more after a speculation that finished before the verification,
               two fewer after one that outlasted it. When the verification returns, the branch whose
               context equals the committed tokens hands its window to the target at once (a hit);
               otherwise the draft drafts anew (a miss).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.config import DecodeConfig
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
MAX_BONUS_GUESSES = 4  # guesses at the one token of a plain decode step


@dataclass
class SequenceStats:
    drafted: int = 0  # drafted tokens sent for verification
    accepted: int = 0
    verifications: int = 0  # verifications that carried at least one drafted token
    predraft_hits: int = 0  # verifications whose next window was ready (pre-drafted)
    predraft_misses: int = 0
    alt_hits: int = 0  # of the hits, those served by a rejected-at-j speculation
    speculated_branches: list[int] = field(default_factory=list)  # outcomes drafted ahead, per verification
    accepted_lengths: list[int] = field(default_factory=list)  # per verification with a window
    window_sizes: list[int] = field(default_factory=list)
    started: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each generated token was committed


@dataclass
class Drafted:
    """Drafted tokens with what the target needs to judge them."""

    tokens: list[int]
    probs: torch.Tensor | None  # the draft's distributions (sampling only)
    alternatives: list[list[int]]  # the draft's next choices at each position, likeliest first

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, count: int) -> "Drafted":
        return Drafted(self.tokens[:count], None if self.probs is None else self.probs[:count],
                       self.alternatives[:count])


EMPTY = Drafted([], None, [])


@dataclass
class Speculation:
    """A window drafted ahead for one possible outcome of the verification in flight."""

    context: list[int]  # the committed tokens this outcome leads to
    drafted: Drafted
    after_rejection: bool  # the outcome is a rejected token (not all accepted plus a bonus)


@dataclass(frozen=True)
class Outcomes:
    """The outcomes a speculation request drafts for: rejections (fork position, corrected token),
    then `bonus_guesses` guesses of the bonus token after the whole window."""

    context: list[int]  # committed tokens + the window being verified
    forks: list[int]
    heads: list[int]
    bonus_guesses: int


def likeliest_outcomes(window: Drafted, committed: int, budget: int) -> tuple[list[tuple[int, int]], int]:
    """Up to `budget` outcomes of verifying `window` after `committed` tokens, likeliest first:
    all accepted with the draft's top bonus guess; then rejected at each position j with the draft's
    runner-up there; the second bonus guess; third choices at each j; and so on. Returns the
    rejections as (fork position, token) and the number of bonus guesses."""
    if not any(window.alternatives):  # a plain decode (or prefill) step: its one token is the bonus
        return [], min(budget, MAX_BONUS_GUESSES)
    rejections: list[tuple[int, int]] = []
    bonus = 1
    rank = 0
    while bonus + len(rejections) < budget:
        level = [(committed + j, choices[rank]) for j, choices in enumerate(window.alternatives)
                 if rank < len(choices)]
        if not level:
            break
        rejections += level[: budget - bonus - len(rejections)]
        if bonus + len(rejections) < budget:
            bonus += 1
        rank += 1
    return rejections, bonus


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    tokens: list[int]  # prompt + committed generated tokens
    max_new_tokens: int
    target_view: list[int] = field(default_factory=list)
    draft_view: list[int] = field(default_factory=list)
    window: Drafted | None = None  # drafted for context == tokens, awaiting the target
    verifying: Drafted | None = None  # the window in flight at the target
    verify_sent_at: float = 0.0
    drafting: str | None = None  # "window" or "speculation" while the draft works for this sequence
    outcomes: Outcomes | None = None  # what the speculation on the verification in flight drafts for
    speculations: list[Speculation] = field(default_factory=list)  # its windows, once drafted
    awaited: bool = False  # the verification came back before its speculation did
    verify_request_id: int = 0  # the verification in flight
    # the VerifyNext sent behind it: (accepted, next token) -> the speculation and window it continues with
    chain: dict[tuple[int, int], tuple[Speculation, Drafted]] | None = None
    chain_request_id: int = 0
    finish_reason: str | None = None
    stats: SequenceStats = field(default_factory=SequenceStats)
    k: int = 0  # this sequence's current window size (the configured k unless adapting)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, by slice comparisons (C speed) and bisection."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n  # the usual case: one extends the other
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


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
        self.config = config
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.max_context = max_context
        if concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
        self.concurrency = concurrency
        self.on_tokens = on_tokens
        self.clock = clock
        self.sequences: dict[int, Sequence] = {}  # admitted, in order of admission
        self.waiting: list[Sequence] = []  # not yet admitted: at most `concurrency` run at once
        self.control: dict[str, list[object]] = {"draft": [], "target": []}  # releases to send
        self._next_request_id = 0
        self._in_flight: dict[int, Sequence] = {}
        # branches per speculation: grown while speculations finish inside their verification
        self.branch_budget = min(4, config.max_branches)

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
            self.sequences[sequence.seq_id] = sequence

    @property
    def done(self) -> bool:
        return (
            not self.waiting
            and not any(self.control.values())
            and all(s.finish_reason is not None for s in self.sequences.values())
            and not self._in_flight
        )

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self.sequences.values() if s.finish_reason is None]

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
        for sequence in self.active:
            if sequence.verifying is not None:
                continue
            if self.config.mode == "target-only" or not sequence.generated:
                window = EMPTY  # plain decode step (the first one is the prefill)
            elif sequence.window is not None:
                window = sequence.window
            elif self._window_budget(sequence, len(sequence.tokens), len(sequence.generated)) == 0:
                window = EMPTY  # one token left to make: no point drafting
            else:
                continue
            sequence.window, sequence.verifying = None, window
            sequence.verify_sent_at = self.clock()
            start = min(common_prefix(sequence.target_view, sequence.tokens), len(sequence.tokens) - 1)
            feed = sequence.tokens[start:] + window.tokens
            sequence.target_view = sequence.target_view[:start] + feed  # provisional, trimmed on reply
            request = VerifyRequest(self._new_id(), sequence.seq_id, start, feed, len(window),
                                    window.probs, self.config.sampling)
            sequence.verify_request_id = request.request_id
            return self._issue(sequence, request)
        return None

    def _next_chained(self) -> VerifyNext | None:
        """While the target verifies a window whose outcomes were drafted ahead, sends it those windows,
        so that it goes on with the right one as soon as it knows the outcome (no coordinator hop)."""
        for sequence in self.active:
            if sequence.verifying is None or sequence.chain is not None or not sequence.speculations:
                continue
            chain = {}  # (accepted, next token) -> the speculation drafted for that outcome
            committed = len(sequence.tokens)
            for speculation in sequence.speculations:
                new_tokens = speculation.context[committed:]
                emitted = len(sequence.generated) + len(new_tokens)
                count = self._window_budget(sequence, len(speculation.context), emitted)
                if count and emitted < sequence.max_new_tokens and not self.eos_ids.intersection(new_tokens):
                    chain[(len(new_tokens) - 1, new_tokens[-1])] = (speculation, speculation.drafted.head(count))
            sequence.chain = chain  # an empty one: no outcome to go on from without the coordinator
            if not chain:
                continue
            windows = [window for _, window in chain.values()]
            probs = None if windows[0].probs is None else torch.cat([w.probs for w in windows])
            request = VerifyNext(self._new_id(), sequence.seq_id, sequence.verify_request_id,
                                 [a for a, _ in chain], [t for _, t in chain], [w.tokens for w in windows],
                                 probs, self.config.sampling)
            sequence.chain_request_id = request.request_id
            return self._issue(sequence, request)
        return None

    def _next_draft(self) -> DraftRequest | SpeculateRequest | None:
        if self.config.mode == "target-only":
            return None
        # First, windows the target is waiting for; then pre-drafts behind running verifications.
        for sequence in self.active:
            if sequence.drafting or sequence.verifying is not None or sequence.window is not None:
                continue
            if not sequence.generated:
                continue  # the target's prefill comes first; overlap pre-drafts behind it
            count = self._window_budget(sequence, len(sequence.tokens), len(sequence.generated))
            if count:
                return self._draft(sequence, count)
        if self.config.mode != "overlap":
            return None
        for sequence in self.active:
            if sequence.drafting or sequence.verifying is None or sequence.outcomes is not None:
                continue
            speculation = self._speculate(sequence)
            if speculation is not None:
                return speculation
        return None

    def _draft(self, sequence: Sequence, count: int) -> DraftRequest:
        start, feed = self._draft_feed(sequence, sequence.tokens)
        sequence.drafting = "window"
        alternatives = ALTERNATIVES if self.config.mode == "overlap" else 0
        return self._issue(sequence, DraftRequest(self._new_id(), sequence.seq_id, start, feed, count,
                                                  self.config.sampling, alternatives))

    def _speculate(self, sequence: Sequence) -> SpeculateRequest | None:
        """Drafts ahead, in one request, for the likeliest outcomes of the verification in flight."""
        window = sequence.verifying
        context = sequence.tokens + window.tokens
        generated = len(sequence.generated)
        count = self._window_budget(sequence, len(context) + 1, generated + len(window) + 1)
        if not count or len(context) + count >= self.max_context:
            return None
        rejections, bonus_guesses = likeliest_outcomes(window, len(sequence.tokens), self.branch_budget)
        sequence.outcomes = Outcomes(context, [fork for fork, _ in rejections], [head for _, head in rejections],
                                     bonus_guesses)
        start, feed = self._draft_feed(sequence, context)
        sequence.drafting = "speculation"
        return self._issue(sequence, SpeculateRequest(
            self._new_id(), sequence.seq_id, start, feed, sequence.outcomes.forks, sequence.outcomes.heads,
            bonus_guesses, count, self.config.sampling, ALTERNATIVES))

    def _draft_feed(self, sequence: Sequence, context: list[int]) -> tuple[int, list[int]]:
        """Where the draft's cache must roll back to for `context`, and what it must read from there."""
        start = min(common_prefix(sequence.draft_view, context), len(context) - 1)
        feed = context[start:]
        sequence.draft_view = sequence.draft_view[:start] + feed  # set from the reply
        return start, feed

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
        elif not isinstance(reply, Skipped):  # a Skipped VerifyNext was already counted as a miss
            self._on_drafted(sequence, reply)

    def _on_drafted(self, sequence: Sequence, reply: DraftResult | SpeculateResult) -> None:
        sequence.drafting = None
        if isinstance(reply, SpeculateResult):
            sequence.draft_view = sequence.draft_view[: reply.cached]
        else:
            sequence.draft_view = sequence.draft_view + reply.tokens[:-1]
        if len(sequence.draft_view) != reply.cached:
            raise RuntimeError(
                f"draft cache of sequence {sequence.seq_id} holds {reply.cached} positions, expected "
                f"{len(sequence.draft_view)}"
            )
        if sequence.finish_reason is not None:
            return
        if isinstance(reply, DraftResult):
            sequence.window = Drafted(reply.tokens, reply.probs,
                                      reply.alternatives)
            return
        sequence.speculations = self._speculations(sequence.outcomes, reply)
        if sequence.awaited:  # the verification came back first
            sequence.awaited = False
            self._use_or_miss(sequence)

    def _speculations(self, outcomes: Outcomes, reply: SpeculateResult) -> list[Speculation]:
        branches, count = len(reply.heads), len(reply.tokens[0]) if reply.tokens else 0
        if branches != len(outcomes.heads) + outcomes.bonus_guesses or any(len(t) != count for t in reply.tokens):
            raise RuntimeError(f"the draft answered a speculation on {len(outcomes.heads) + outcomes.bonus_guesses} "
                               f"outcomes with {branches} branches")
        probs = None if reply.probs is None else reply.probs.reshape(branches * count, -1)
        speculations = []
        for i, head in enumerate(reply.heads):
            rejected = i < len(outcomes.forks)
            context = (outcomes.context[: outcomes.forks[i]] if rejected else outcomes.context) + [head]
            branch_probs = None if probs is None else probs[i * count : (i + 1) * count]
            speculations.append(Speculation(context, Drafted(reply.tokens[i], branch_probs, reply.alternatives[i]),
                                            rejected))
        return speculations

    def _on_verified(self, sequence: Sequence, reply: VerifyResult) -> None:
        window, sequence.verifying = sequence.verifying, None
        sequence.target_view = sequence.target_view[: reply.cached]
        if len(sequence.target_view) != reply.cached:
            raise RuntimeError(f"target cache of sequence {sequence.seq_id} holds {reply.cached} positions")
        stats = sequence.stats
        if window.tokens and self.config.adaptive_k:
            full = reply.accepted == len(window)
            sequence.k = min(self.config.k, sequence.k + 1) if full else max(1, reply.accepted + 1)
        if window.tokens:
            stats.verifications += 1
            stats.drafted += len(window)
            stats.accepted += reply.accepted
            stats.accepted_lengths.append(reply.accepted)
            stats.window_sizes.append(len(window))
        self._commit(sequence, window.tokens[: reply.accepted] + [reply.next_token])
        chain, sequence.chain = sequence.chain, None
        if sequence.finish_reason is not None:
            return  # a VerifyNext sent behind it is skipped: its outcomes all go on
        if sequence.outcomes is None:
            return
        if sequence.drafting == "speculation":  # still drafting: it outlasted the verification
            self.branch_budget = max(1, self.branch_budget - 2)
            sequence.awaited = True
            return
        self.branch_budget = min(self.config.max_branches, self.branch_budget + 1)
        if chain:  # the target goes on by itself with the window for this outcome, if it has one
            self._go_on(sequence, chain.get((reply.accepted, reply.next_token)))
        else:
            self._use_or_miss(sequence)

    def _go_on(self, sequence: Sequence, chained: tuple[Speculation, Drafted] | None) -> None:
        """The verification that VerifyNext continued came back: the target is now verifying the window
        for its outcome (a hit), or skips (a miss, and the draft drafts anew)."""
        speculations, sequence.speculations, sequence.outcomes = sequence.speculations, [], None
        stats = sequence.stats
        stats.speculated_branches.append(len(speculations))
        if chained is None:
            stats.predraft_misses += 1
            return
        speculation, window = chained
        stats.predraft_hits += 1
        stats.alt_hits += speculation.after_rejection
        sequence.verifying = window
        sequence.verify_request_id = sequence.chain_request_id
        sequence.verify_sent_at = self.clock()
        sequence.target_view = sequence.target_view + [sequence.tokens[-1]] + window.tokens  # trimmed on reply

    def _use_or_miss(self, sequence: Sequence) -> None:
        """Hands the target the pre-drafted window for the outcome that happened, if one was drafted."""
        speculations, sequence.speculations, sequence.outcomes = sequence.speculations, [], None
        stats = sequence.stats
        stats.speculated_branches.append(len(speculations))
        hit = next((s for s in speculations if s.context == sequence.tokens), None)
        if hit is None:
            stats.predraft_misses += 1
            return
        stats.predraft_hits += 1
        stats.alt_hits += hit.after_rejection
        count = self._window_budget(sequence, len(sequence.tokens), len(sequence.generated))
        sequence.window = hit.drafted.head(count)

    def _commit(self, sequence: Sequence, new_tokens: list[int]) -> None:
        now = self.clock()
        for i, token in enumerate(new_tokens):
            if token in self.eos_ids:
                new_tokens = new_tokens[: i + 1]
                sequence.finish_reason = "eos"
                break
        sequence.tokens.extend(new_tokens)
        stats = sequence.stats
        if stats.first_token_at is None:
            stats.first_token_at = now
        stats.token_times.extend([now] * len(new_tokens))
        if sequence.finish_reason is None:
            if len(sequence.generated) >= sequence.max_new_tokens:
                sequence.finish_reason = "length"
            elif len(sequence.tokens) >= self.max_context:
                sequence.finish_reason = "length"  # the context is full
        if self.on_tokens is not None:
            self.on_tokens(sequence, new_tokens)
        if sequence.finish_reason is not None:
            stats.finished_at = now
            sequence.window, sequence.awaited, sequence.outcomes, sequence.speculations = None, False, None, []
            for role in ("target",) if self.config.mode == "target-only" else ("draft", "target"):
                self.control[role].append(Release(sequence.seq_id))
