"""The coordinator's algorithm: which request each worker gets next, and what each reply means.

It knows nothing of processes, sockets or wire formats (vLLM's EngineCore split): `next_request(role)`
hands out work for a worker, `on_reply(reply)` takes a worker's answer. Work goes out in batches
(continuous batching): one TargetBatch verifies the windows of every sequence that has one ready, beside
a prompt chunk or two, in one forward pass; one DraftBatch drafts for every sequence that needs a window
and drafts ahead for every verification in flight. Sequences join and leave between batches. Each worker
runs one batch at a time (the target may hold one batch of VerifyNexts queued behind it); the engine
around this class moves the messages. Every sequence moves through the phases of `pipeline.algorithm.sequence.Phase`.

Admission is bounded by --concurrency and --max-seqs (the workers' KV slots); the rest wait in order.
A prompt is prefilled in chunks of --prefill-chunk tokens at multiples of it (so a sequence's chunks, and
with them its tokens, never depend on what shares its batches); each target step carries at most that
many prompt tokens beside the running windows, so a long prompt never stalls the running streams for
its whole length. With --k-policy goodput, `pipeline.algorithm.speculation` chooses each sequence's k per step.

Modes:
  target-only  the target decodes one token per pass (the baseline, through the same worker);
  serial       draft k tokens, then verify them, then draft again;
  overlap      while the target verifies window i, the draft drafts window i+1 for the likeliest
               outcomes of that verification at once, in one batched request (`pipeline.algorithm.drafting`).
               When the drafted-ahead windows arrive before the verification ends, they follow it
               to the target as a VerifyNext, and the target goes on with the one for the outcome it
               finds; otherwise the coordinator hands over the window for the outcome (a hit), or the
               draft drafts anew (a miss).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pipeline.algorithm.drafting import (
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
from pipeline.algorithm.sequence import Phase, Sequence, common_prefix
from pipeline.algorithm.speculation import GoodputController
from pipeline.config import DecodeConfig
from workers.protocol.messages import (
    DraftBatch,
    DraftBatchResult,
    DraftRequest,
    DraftResult,
    ErrorReply,
    PrefillChunk,
    Prefilled,
    Release,
    Skipped,
    SpeculateRequest,
    SpeculateResult,
    TargetBatch,
    TargetBatchResult,
    VerifyNext,
    VerifyRequest,
    VerifyResult,
    batch_items,
)
from workers.sampling import SamplingParams

ItemReply = DraftResult | SpeculateResult | VerifyResult | Prefilled | Skipped | ErrorReply

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
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
        self.config = config
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.max_context = max_context
        self.concurrency = min(concurrency, config.max_seqs)  # sequences running at once
        self.on_tokens = on_tokens
        self.clock = clock  # stamps the statistics (TTFT, token times)
        self.roles = config.roles  # the workers that hold its sequences' KV slots
        self.sequences: dict[int, Sequence] = {}  # admitted, in order of admission
        self.waiting: list[Sequence] = []  # not yet admitted: at most `concurrency` run at once
        self.control: dict[str, list[object]] = {"draft": [], "target": []}  # releases to send
        self.branch_budget = BranchBudget(config.max_branches)
        self.on_event = on_event  # a line for the log: the controller switched speculation off or on
        self.controller = None
        if config.k_policy == "goodput" and config.uses_draft:
            self.controller = GoodputController(config.k, config.mode, clock=clock, on_event=on_event)
        self._next_request_id = 0
        self._in_flight: dict[int, Sequence] = {}  # item request id -> its sequence
        self._batches: dict[int, set[int]] = {}  # batch request id -> its items not answered yet
        self._batch_of: dict[int, int] = {}  # item request id -> its batch

    # --- admission ------------------------------------------------------------------------------

    def add(self, seq_id: int, prompt: list[int], max_new_tokens: int | None = None,
            sampling: SamplingParams | None = None) -> Sequence:
        """Queues a sequence; `max_new_tokens` and `sampling` default to the config's (--max-new-tokens,
        --temperature...), and a server passes each request's own."""
        if not prompt:
            raise ValueError("an empty prompt cannot be continued; give at least one token")
        if len(prompt) >= self.max_context:
            raise ValueError(
                f"prompt of {len(prompt)} tokens does not fit the context of {self.max_context} tokens "
                "(leave room for at least one new token)"
            )
        if seq_id in self.sequences or any(s.seq_id == seq_id for s in self.waiting):
            raise ValueError(f"sequence {seq_id} exists already")
        max_new = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new}")
        sequence = Sequence(seq_id, list(prompt), list(prompt), max_new, k=self.config.k,
                            sampling=self.config.sampling if sampling is None else sampling)
        self.waiting.append(sequence)
        return sequence

    def _admit(self) -> None:
        admitted = False
        while self.waiting and len(self.active) < self.concurrency:
            sequence = self.waiting.pop(0)
            sequence.stats.started = self.clock()
            sequence.phase, sequence.window = Phase.READY, EMPTY  # the prompt's prefill: a plain step
            self.sequences[sequence.seq_id] = sequence
            admitted = True
        if admitted:
            self._replan()

    def _replan(self) -> None:
        """--k-policy goodput: every running sequence's k for the next step."""
        if self.controller is None:
            return
        # the sequences the next pass verifies a window of, and the prompt rows it reads beside them
        decoding, prompt_rows = [], 0
        for sequence in self.active:
            if sequence.generated or sequence.phase is Phase.VERIFYING:  # nothing generated: its prompt's last chunk
                decoding.append(sequence.seq_id)
            else:
                prompt_rows += len(sequence.prompt) - self._prompt_cached(sequence)
        if self.config.prefill_chunk:
            prompt_rows = min(prompt_rows, self.config.prefill_chunk)
        branches = self.branch_budget.value if self.config.mode == "overlap" else 1
        plan = self.controller.plan(decoding, branches, prompt_rows)
        for seq_id, k in plan.ks.items():
            sequence = self.sequences[seq_id]
            sequence.k = k
            if sequence.phase is Phase.DRAFT_NEEDED and not self._next_window_budget(sequence):
                # it waited for the draft, busy with others, and now drafts nothing: a plain step for the target
                # (left to the draft's turn, the target's turn would have passed, and with nothing else in
                # flight no reply would ever come to move it: the stall of issue 32)
                sequence.phase, sequence.window = Phase.READY, EMPTY

    def observe_pass(self, role: str, rows: int, steps: int, seconds: float) -> None:
        """A batch's measured round trip: `steps` forward passes of `rows` rows in all (what the controller
        learns the cost curves from)."""
        if self.controller is None or rows < 1:
            return
        if role == "target":
            self.controller.observe_target(rows, seconds)
        else:
            self.controller.observe_draft(rows / max(1, steps), max(1, steps), seconds)

    def controller_summary(self) -> dict[str, object] | None:
        """What the goodput controller decided over the run (None without one)."""
        return None if self.controller is None else self.controller.summary()

    def fail(self, seq_id: int, message: str) -> None:
        """A worker could not serve one of the sequence's requests: it ends, and no other sequence is touched."""
        sequence = self.sequences.get(seq_id)
        if sequence is not None and sequence.phase is not Phase.FINISHED:
            sequence.error = message
            self._finish(sequence, "error", self.clock())

    @property
    def done(self) -> bool:
        return (
            not self.waiting
            and not any(self.control.values())
            and all(s.phase is Phase.FINISHED for s in self.sequences.values())
            and not self._in_flight
            and not self._batches
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
        self.forget_in_flight()
        return list(self.sequences)

    def cancel_sequence(self, seq_id: int) -> bool:
        """Ends one sequence as "cancelled" (its client went away): a waiting one leaves the queue, a running
        one frees its KV slots in both workers (the releases follow whatever is in flight for it, whose
        replies are dropped). False if it had finished already."""
        for i, sequence in enumerate(self.waiting):
            if sequence.seq_id == seq_id:
                del self.waiting[i]
                self._finish(sequence, "cancelled", self.clock(), release=False)  # no slot held yet
                return True
        sequence = self.sequences.get(seq_id)
        if sequence is None or sequence.phase is Phase.FINISHED:
            return False
        self._finish(sequence, "cancelled", self.clock())
        return True

    def forget_in_flight(self) -> None:
        """Stops awaiting every request sent (the engine knows none is at a worker any more)."""
        self._in_flight.clear()
        self._batches.clear()
        self._batch_of.clear()

    def prune(self) -> list[Sequence]:
        """Forgets the finished sequences that nothing in flight refers to any more (a server runs for days);
        returns them."""
        referred = {id(sequence) for sequence in self._in_flight.values()}
        pruned = [s for s in self.sequences.values() if s.phase is Phase.FINISHED and id(s) not in referred]
        for sequence in pruned:
            del self.sequences[sequence.seq_id]
        return pruned

    # --- handing out work -----------------------------------------------------------------------

    def next_request(self, role: str, unanswered: int = 0) -> object | None:
        """The next message for a worker of `role` that has `unanswered` batches, or None if there is nothing
        useful to send it now. An idle worker gets anything: a release, or a batch of all the work it can do
        now; a verifying target only a batch of the VerifyNexts that continue its verifications."""
        if unanswered:
            return self._chained_batch() if role == "target" and unanswered == 1 else None
        if self.control[role]:
            return self.control[role].pop(0)
        self._admit()
        return self._target_batch() if role == "target" else self._draft_batch()

    def _target_batch(self) -> TargetBatch | None:
        prefills: list[PrefillChunk] = []
        verifies: list[VerifyRequest] = []
        budget = self.config.prefill_chunk or self.max_context  # prompt tokens this step may read
        for sequence in self.active:
            if sequence.phase is not Phase.READY:
                continue
            if sequence.generated:
                verifies.append(self._verify(sequence))
                continue
            chunk = self._prompt_chunk(sequence)  # the prompt's prefill: one chunk per step
            if chunk > budget:
                continue  # a later step's: this one has read its share of prompt tokens
            budget -= chunk
            request = self._prefill(sequence, chunk)
            (prefills if isinstance(request, PrefillChunk) else verifies).append(request)
        if not prefills and not verifies:
            return None
        return self._batch(TargetBatch(self._new_id(), prefills, verifies, []))

    def _prompt_chunk(self, sequence: Sequence) -> int:
        """How many prompt tokens the sequence's next prefill step reads: up to the next multiple of
        --prefill-chunk, or the rest of the prompt."""
        start = self._prompt_cached(sequence)
        size = self.config.prefill_chunk
        end = len(sequence.prompt) if not size else min(len(sequence.prompt), (start // size + 1) * size)
        return end - start

    @staticmethod
    def _prompt_cached(sequence: Sequence) -> int:
        """Prompt positions the target holds (never all: the last prompt token is read by the last chunk)."""
        return min(common_prefix(sequence.target_cache.tokens, sequence.prompt), len(sequence.prompt) - 1)

    def _prefill(self, sequence: Sequence, chunk: int) -> PrefillChunk | VerifyRequest:
        start = self._prompt_cached(sequence)
        if start + chunk < len(sequence.prompt):  # not the last chunk: only read
            sequence.target_cache.tokens = sequence.prompt[: start + chunk]
            sequence.phase = Phase.PREFILLING
            request = PrefillChunk(self._new_id(), sequence.seq_id, start, sequence.prompt[start : start + chunk])
            return self._issue(sequence, request)
        return self._verify(sequence, prompt=True)

    def _verify(self, sequence: Sequence, prompt: bool = False) -> VerifyRequest:
        window, sequence.window = sequence.window, None
        start, feed = sequence.target_cache.feed(sequence.tokens)
        feed = feed + window.tokens
        sequence.target_cache.extend(window.tokens)  # trimmed to what was accepted on reply
        request = VerifyRequest(self._new_id(), sequence.seq_id, start, feed, len(window), window.probs,
                                sequence.sampling, prompt)
        sequence.phase, sequence.verification = Phase.VERIFYING, Verification(request.request_id, window)
        return self._issue(sequence, request)

    def _chained_batch(self) -> TargetBatch | None:
        if len(self.active) > 1:
            # With several sequences running, a batch of VerifyNexts behind the step would split the next step
            # into two passes, each streaming the weights once: the hits wait for the step to return instead.
            return None
        continues = [request for request in map(self._chained, self.active) if request is not None]
        return self._batch(TargetBatch(self._new_id(), [], [], continues)) if continues else None

    def _chained(self, sequence: Sequence) -> VerifyNext | None:
        """While the target verifies a window whose outcomes were drafted ahead, sends it those windows,
        so that it goes on with the right one as soon as it knows the outcome (no coordinator hop)."""
        ahead = sequence.verification.ahead if sequence.phase is Phase.VERIFYING else None
        if ahead is None or ahead.branches is None or ahead.chain is not None:
            return None
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
            return None
        sent = [window for _, window in windows.values()]
        probs = None if sent[0].probs is None else torch.cat([w.probs for w in sent])
        request = VerifyNext(self._new_id(), sequence.seq_id, sequence.verification.request_id,
                             [a for a, _ in windows], [t for _, t in windows], [w.tokens for w in sent],
                             probs, sequence.sampling)
        ahead.chain = Chain(request.request_id, windows)
        return self._issue(sequence, request)

    def _draft_batch(self) -> DraftBatch | None:
        # Windows the target is waiting for; then drafting ahead behind running verifications.
        drafts = [request for request in (self._draft(s) for s in self.active if s.phase is Phase.DRAFT_NEEDED)
                  if request is not None]
        speculations = []
        if self.config.mode == "overlap":
            for sequence in self.active:
                if sequence.phase is Phase.VERIFYING and sequence.verification.ahead is None:
                    request = self._draft_ahead(sequence)
                    if request is not None:
                        speculations.append(request)
        if not drafts and not speculations:
            return None
        return self._batch(DraftBatch(self._new_id(), drafts, speculations))

    def _batch(self, batch: TargetBatch | DraftBatch) -> TargetBatch | DraftBatch:
        items = batch_items(batch)
        self._batches[batch.request_id] = {item.request_id for item in items}
        for item in items:
            self._batch_of[item.request_id] = batch.request_id
        return batch

    def _window_budget(self, sequence: Sequence, context_len: int, emitted_before: int) -> int:
        """How many tokens a window for a context of `context_len` may draft."""
        remaining = sequence.max_new_tokens - emitted_before
        # prompt + output never exceed the context: a verification adds up to k + 1 tokens
        room = self.max_context - context_len - 1
        return max(0, min(sequence.k, remaining - 1, room))

    def _next_window_budget(self, sequence: Sequence) -> int:
        """How many tokens the window after its committed tokens may draft."""
        return self._window_budget(sequence, len(sequence.tokens), len(sequence.generated))

    def _draft(self, sequence: Sequence) -> DraftRequest | None:
        """A window for the committed tokens; None, and a plain step, if its k became 0 meanwhile."""
        count = self._next_window_budget(sequence)
        if count == 0:
            sequence.phase, sequence.window = Phase.READY, EMPTY
            return None
        start, feed = sequence.draft_cache.feed(sequence.tokens)
        alternatives = ALTERNATIVES if self.config.mode == "overlap" else 0
        sequence.phase = Phase.DRAFTING
        return self._issue(sequence, DraftRequest(self._new_id(), sequence.seq_id, start, feed, count,
                                                  sequence.sampling, alternatives))

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
                                   bonus_guesses, count, sequence.sampling, ALTERNATIVES)
        sequence.verification.ahead = DraftAhead(request.request_id, outcomes)
        return self._issue(sequence, request)

    def _issue(self, sequence: Sequence, request):
        self._in_flight[request.request_id] = sequence
        return request

    def _new_id(self) -> int:
        self._next_request_id += 1
        return self._next_request_id

    # --- taking replies -------------------------------------------------------------------------

    def on_reply(self, reply: TargetBatchResult | DraftBatchResult | ItemReply) -> None:
        """A batch's result (every item's answer), or one item's answer."""
        if isinstance(reply, TargetBatchResult):
            self._replan()  # once per target step, before its outcomes decide the next windows
            items: list[ItemReply] = [*reply.prefilled, *reply.verified, *reply.skipped, *reply.errors]
        elif isinstance(reply, DraftBatchResult):
            items = [*reply.drafted, *reply.speculated, *reply.errors]
        else:
            return self._on_item(reply)
        if reply.request_id not in self._batches:
            raise ValueError(f"reply to unknown batch {reply.request_id}")
        for item in items:
            self._on_item(item)
        missing = self._batches.pop(reply.request_id, set())
        if missing:
            raise RuntimeError(f"batch {reply.request_id} came back without an answer for requests "
                               f"{sorted(missing)}")

    def _on_item(self, reply: ItemReply) -> None:
        sequence = self._in_flight.pop(reply.request_id, None)
        if sequence is None:
            raise ValueError(f"reply to unknown request {reply.request_id}")
        batch = self._batch_of.pop(reply.request_id, None)
        if batch is not None:
            pending = self._batches[batch]
            pending.discard(reply.request_id)
            if not pending:
                del self._batches[batch]
        if sequence.phase is Phase.FINISHED:
            # Its slots are being released: what a late reply says of its caches no longer matters (a VerifyNext
            # the target went on with after the sequence was cancelled holds positions no mirror was told of).
            return
        if isinstance(reply, VerifyResult):
            self._on_verified(sequence, reply)
        elif isinstance(reply, Prefilled):
            sequence.target_cache.settle(reply.cached, sequence.seq_id)
            if sequence.phase is Phase.PREFILLING:
                sequence.phase, sequence.window = Phase.READY, EMPTY
        elif isinstance(reply, DraftResult):
            self._on_drafted(sequence, reply)
        elif isinstance(reply, SpeculateResult):
            self._on_drafted_ahead(sequence, reply)
        elif isinstance(reply, ErrorReply):
            self.fail(sequence.seq_id, reply.message)
        # a Skipped VerifyNext: the verification before it was resolved as a miss already

    def _on_drafted(self, sequence: Sequence, reply: DraftResult) -> None:
        sequence.draft_cache.extend(reply.tokens[:-1])  # read back in, all but the last
        sequence.draft_cache.settle(reply.cached, sequence.seq_id)
        self._check_probs(sequence, reply.probs, (len(reply.tokens), self.vocab_size))
        sequence.phase, sequence.window = Phase.READY, Drafted(reply.tokens, reply.probs, reply.alternatives)

    def _on_drafted_ahead(self, sequence: Sequence, reply: SpeculateResult) -> None:
        sequence.draft_cache.settle(reply.cached, sequence.seq_id)
        ahead = sequence.verification.ahead
        ahead.branches = self._branches(sequence, ahead.outcomes, reply)
        if sequence.phase is Phase.AWAITING_AHEAD:  # the verification came back first
            self._after_verification(sequence)

    def _branches(self, sequence: Sequence, outcomes: Outcomes, reply: SpeculateResult) -> list[Branch]:
        branches, count = len(reply.heads), len(reply.tokens[0]) if reply.tokens else 0
        if branches != outcomes.branches or any(len(t) != count for t in reply.tokens):
            raise RuntimeError(f"the draft answered a speculation on {outcomes.branches} outcomes with {branches} "
                               "branches")
        self._check_probs(sequence, reply.probs, (branches, count, self.vocab_size))
        drafted = []
        for i, head in enumerate(reply.heads):
            rejected = i < len(outcomes.forks)
            context = (outcomes.context[: outcomes.forks[i]] if rejected else outcomes.context) + [head]
            probs = None if reply.probs is None else reply.probs[i]
            drafted.append(Branch(context, Drafted(reply.tokens[i], probs, reply.alternatives[i]), rejected))
        return drafted

    @staticmethod
    def _check_probs(sequence: Sequence, probs: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        needed = sequence.sampling.needs_draft_probs
        if (probs is not None) != needed or (probs is not None and tuple(probs.shape) != shape):
            got = "none" if probs is None else "x".join(map(str, probs.shape))
            raise RuntimeError(f"the draft sent distributions of shape {got}; expected "
                               f"{'x'.join(map(str, shape)) if needed else 'none (greedy or position-keyed)'}")

    def _on_verified(self, sequence: Sequence, reply: VerifyResult) -> None:
        sequence.target_cache.settle(reply.cached, sequence.seq_id)
        verification = sequence.verification
        if reply.request_id != verification.request_id:
            raise RuntimeError(f"sequence {sequence.seq_id}: verification {reply.request_id} came back while "
                               f"{verification.request_id} was expected")
        window = verification.window
        stats = sequence.stats
        if not window.tokens and sequence.generated:
            stats.plain_steps += 1
        if window.tokens:
            stats.verifications += 1
            stats.drafted += len(window)
            stats.accepted += reply.accepted
            stats.accepted_lengths.append(reply.accepted)
            stats.window_sizes.append(len(window))
            if self.controller is not None:
                self.controller.observe_acceptance(sequence.seq_id, len(window), reply.accepted)
            if self.config.k_policy == "adaptive":
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
            if self.controller is not None:
                self.controller.observe_predraft(resolved.how is not Resolution.MISS)
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
        count = self._next_window_budget(sequence)
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
        if self.controller is not None:
            self.controller.forget(sequence.seq_id)
        if release:
            for role in self.roles:
                self.control[role].append(Release(sequence.seq_id))
