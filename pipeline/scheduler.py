"""The coordinator's algorithm: which request each worker gets next, and what each reply means.

It knows nothing of processes or sockets (vLLM's EngineCore split): `next_request(role)` hands out
work for an idle worker, `on_reply(reply)` takes a worker's answer. Each worker runs one request
at a time; the engine around this class moves the messages.

For every sequence the scheduler mirrors the token ids whose keys and values each worker holds
(`draft_view`, `target_view`), so every request says exactly where to roll back to and what to read.

Modes:
  target-only  the target decodes one token per pass (the baseline, through the same worker);
  serial       draft k tokens, then verify them, then draft again;
  overlap      while the target verifies window i, the draft speculates on its outcome and drafts
               window i+1 for the likeliest ones: first "all accepted, and the target's bonus token is
               the draft's own next token"; then, while the verification is expected to last, "rejected
               at position j, corrected to the draft's runner-up token there" for j = 0, 1, ...
               (pre-speculating verification outcomes, as SSD/Saguaro do). When the verification
               returns, a speculation whose context equals the committed tokens hands its window to
               the target at once (a hit); otherwise the draft drafts anew (a miss).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline.protocol import (
    DraftRequest,
    DraftResult,
    Release,
    VerifyRequest,
    VerifyResult,
    bytes_to_tensor,
    tensor_to_bytes,
)
from workers.sampling import SamplingParams

MODES = ("overlap", "serial", "target-only")


@dataclass(frozen=True)
class DecodeConfig:
    mode: str = "overlap"
    k: int = 5
    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    # Adapt each sequence's window between 1 and k: one longer after a fully accepted window, down
    # to accepted + 1 after a rejection (the schedule of transformers' assisted generation, PEARL's
    # adaptive draft length in spirit).
    adaptive_k: bool = False

    def validate(self, max_context: int) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; --mode takes one of {', '.join(MODES)}")
        if not 1 <= self.k < max_context:
            raise ValueError(f"--k must be between 1 and {max_context - 1} (the context), got {self.k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        self.sampling.validate()


@dataclass
class SequenceStats:
    drafted: int = 0  # drafted tokens sent for verification
    accepted: int = 0
    verifications: int = 0  # verifications that carried at least one drafted token
    predraft_hits: int = 0  # verifications whose next window was ready (pre-drafted)
    predraft_misses: int = 0
    alt_hits: int = 0  # of the hits, those served by a rejected-at-j speculation
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
    runner_up: list[int]  # the draft's next-best token at each position

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, count: int) -> "Drafted":
        return Drafted(self.tokens[:count], None if self.probs is None else self.probs[:count], self.runner_up[:count])


EMPTY = Drafted([], None, [])


@dataclass
class Speculation:
    """A window drafted ahead for one possible outcome of the verification in flight."""

    context: list[int]  # the committed tokens this outcome leads to (without the bonus, if guessed)
    guesses_bonus: bool  # the first drafted token is a guess of the target's bonus token
    drafted: Drafted | None = None  # None while the draft is still working on it

    def matches(self, committed: list[int]) -> bool | None:
        """Whether this speculation continues `committed`; None when only its result can tell."""
        if not self.guesses_bonus:
            return committed == self.context
        if len(committed) != len(self.context) + 1 or committed[:-1] != self.context:
            return False
        return None if self.drafted is None else committed[-1] == self.drafted.tokens[0]

    def window(self, count: int) -> Drafted:
        drafted = self.drafted
        if self.guesses_bonus:
            drafted = Drafted(drafted.tokens[1:], None if drafted.probs is None else drafted.probs[1:],
                              drafted.runner_up[1:])
        return drafted.head(count)


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
    drafting: Speculation | str | None = None  # "window", or the speculation being drafted
    speculations: list[Speculation] = field(default_factory=list)  # on the verification in flight
    awaited: Speculation | None = None  # verification back, its matching speculation still drafting
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
        # running estimates that decide whether a further speculation still fits inside a verification
        self.verify_s = 0.010
        self.draft_token_s = 0.002

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

    def next_request(self, role: str) -> object | None:
        """The next request for an idle worker of `role`, or None if it has nothing useful to do."""
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
            return self._issue(
                sequence,
                VerifyRequest(
                    self._new_id(), sequence.seq_id, start, feed, len(window), tensor_to_bytes(window.probs),
                    self.config.sampling,
                ),
            )
        return None

    def _next_draft(self) -> DraftRequest | None:
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
                return self._draft(sequence, sequence.tokens, count, "window")
        if self.config.mode != "overlap":
            return None
        for sequence in self.active:
            if sequence.drafting or sequence.verifying is None:
                continue
            speculation = self._next_speculation(sequence)
            if speculation is not None:
                return speculation
        return None

    def _next_speculation(self, sequence: Sequence) -> DraftRequest | None:
        """The next outcome of the running verification worth drafting for, likeliest first."""
        window = sequence.verifying
        tried = len(sequence.speculations)
        generated = len(sequence.generated)
        if tried == 0:  # all accepted; the first drafted token guesses the bonus
            context = sequence.tokens + window.tokens
            count = self._window_budget(sequence, len(context) + 1, generated + len(window) + 1)
            if count and len(context) + count < self.max_context:
                return self._speculate(sequence, Speculation(context, guesses_bonus=True), count + 1)
            return None
        j = tried - 1  # then: rejected at position j, corrected to the draft's runner-up
        if j >= len(window):
            return None
        context = sequence.tokens + window.tokens[:j] + [window.runner_up[j]]
        count = self._window_budget(sequence, len(context), generated + j + 1)
        cost = (count + 1) * self.draft_token_s
        if count == 0 or self.clock() - sequence.verify_sent_at + cost > self.verify_s:
            return None  # it would outlast the verification and delay the draft the target then needs
        return self._speculate(sequence, Speculation(context, guesses_bonus=False), count)

    def _speculate(self, sequence: Sequence, speculation: Speculation, count: int) -> DraftRequest:
        sequence.speculations.append(speculation)
        return self._draft(sequence, speculation.context, count, speculation)

    def _draft(self, sequence: Sequence, context: list[int], count: int, kind: Speculation | str) -> DraftRequest:
        start = min(common_prefix(sequence.draft_view, context), len(context) - 1)
        feed = context[start:]
        sequence.drafting = kind
        sequence.draft_view = sequence.draft_view[:start] + feed  # extended by the reply
        return self._issue(
            sequence, DraftRequest(self._new_id(), sequence.seq_id, start, feed, count, self.config.sampling)
        )

    def _issue(self, sequence: Sequence, request):
        self._in_flight[request.request_id] = sequence
        return request

    def _new_id(self) -> int:
        self._next_request_id += 1
        return self._next_request_id

    # --- taking replies -------------------------------------------------------------------------

    def on_reply(self, reply: DraftResult | VerifyResult) -> None:
        sequence = self._in_flight.pop(reply.request_id, None)
        if sequence is None:
            raise ValueError(f"reply to unknown request {reply.request_id}")
        if isinstance(reply, VerifyResult):
            self._on_verified(sequence, reply)
        else:
            self._on_drafted(sequence, reply)

    def _on_drafted(self, sequence: Sequence, reply: DraftResult) -> None:
        kind, sequence.drafting = sequence.drafting, None
        sequence.draft_view = sequence.draft_view + reply.tokens[:-1]
        if len(sequence.draft_view) != reply.cached:
            raise RuntimeError(
                f"draft cache of sequence {sequence.seq_id} holds {reply.cached} positions, expected "
                f"{len(sequence.draft_view)}"
            )
        self.draft_token_s += 0.2 * (reply.busy_s / len(reply.tokens) - self.draft_token_s)
        if sequence.finish_reason is not None:
            return
        drafted = Drafted(reply.tokens, bytes_to_tensor(reply.probs, len(reply.tokens), self.vocab_size),
                          reply.runner_up)
        if kind == "window":
            sequence.window = drafted
            return
        kind.drafted = drafted
        if kind is sequence.awaited:  # the verification came back and bet on this one
            sequence.awaited = None
            self._use_or_miss(sequence, kind if kind.matches(sequence.tokens) else None)

    def _on_verified(self, sequence: Sequence, reply: VerifyResult) -> None:
        window, sequence.verifying = sequence.verifying, None
        sequence.target_view = sequence.target_view[: reply.cached]
        if len(sequence.target_view) != reply.cached:
            raise RuntimeError(f"target cache of sequence {sequence.seq_id} holds {reply.cached} positions")
        self.verify_s += 0.2 * (reply.busy_s - self.verify_s)
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
        speculations, sequence.speculations = sequence.speculations, []
        if sequence.finish_reason is not None or not speculations:
            return
        for speculation in speculations:
            verdict = speculation.matches(sequence.tokens)
            if verdict and speculation.drafted is not None:
                return self._use_or_miss(sequence, speculation)
            if verdict is None or (verdict and speculation.drafted is None):
                sequence.awaited = speculation  # still drafting: judged when it arrives
                return
        self._use_or_miss(sequence, None)

    def _use_or_miss(self, sequence: Sequence, speculation: Speculation | None) -> None:
        if speculation is None:
            sequence.stats.predraft_misses += 1
            return
        sequence.stats.predraft_hits += 1
        sequence.stats.alt_hits += not speculation.guesses_bonus
        count = self._window_budget(sequence, len(sequence.tokens), len(sequence.generated))
        sequence.window = speculation.window(count)

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
            sequence.window = sequence.awaited = None
            sequence.speculations = []
            for role in ("target",) if self.config.mode == "target-only" else ("draft", "target"):
                self.control[role].append(Release(sequence.seq_id))
