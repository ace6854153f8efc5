"""One worker's request handling, shared by the in-process path (tests) and the worker process."""

from __future__ import annotations

import time

from workers.draft_core import Branches, Draft, DraftCore, DraftJob, SpeculateJob
from workers.errors import SpecpipeError
from workers.model.runner_base import RunnerBase
from workers.protocol.messages import (
    ROLES,
    DraftBatch,
    DraftBatchResult,
    DraftRequest,
    DraftResult,
    ErrorReply,
    Ping,
    Pong,
    PrefillChunk,
    Prefilled,
    Release,
    Released,
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
from workers.request_checks import check_request
from workers.target_core import TargetCore, Verdict, Window

ITEM_ERRORS = (ValueError, SpecpipeError)  # what fails one request (or one item of a batch), not the worker


class WorkerService:
    """Answers protocol requests for one role with one model runner."""

    def __init__(self, role: str, runner: RunnerBase) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use draft or target")
        self.role = role
        self.runner = runner
        self.core = DraftCore(runner) if role == "draft" else TargetCore(runner)
        self.last_verified: dict[int, tuple[int, Verdict]] = {}  # target: seq_id -> (request_id, its verdict)

    def handle(self, message: object) -> object:
        """The reply to `message`. Bad requests get a non-fatal ErrorReply; the worker keeps serving. In a batch,
        a bad item gets its ErrorReply inside the batch's result, and the other items are served."""
        request_id = getattr(message, "request_id", -1)
        try:
            if not isinstance(message, (TargetBatch, DraftBatch)):
                check_request(message, self.runner.config.vocab_size, self.runner.max_seq_len)
            return self._dispatch(message)
        except ITEM_ERRORS as error:
            return ErrorReply(request_id, f"{type(error).__name__}: {error}", fatal=False)

    def reset(self) -> None:
        """Frees every sequence: a new coordinator (Hello) starts with an empty cache."""
        for seq_id in self.core.slots.held:
            self.core.release(seq_id)
        self.last_verified.clear()

    def _dispatch(self, message: object) -> object:
        began = time.perf_counter()
        if isinstance(message, TargetBatch) and self.role == "target":
            return self._target_batch(message, began)
        if isinstance(message, DraftBatch) and self.role == "draft":
            return self._draft_batch(message, began)
        if isinstance(message, DraftRequest) and self.role == "draft":
            draft = self.core.draft(message.seq_id, message.start, message.feed, message.count, message.sampling,
                                    message.alternatives)
            return _drafted(message, draft, time.perf_counter() - began)
        if isinstance(message, SpeculateRequest) and self.role == "draft":
            branches = self.core.speculate(message.seq_id, message.start, message.feed, message.forks, message.heads,
                                           message.bonus_guesses, message.count, message.sampling,
                                           message.alternatives)
            return _speculated(message, branches, time.perf_counter() - began)
        if isinstance(message, (VerifyRequest, PrefillChunk, VerifyNext)) and self.role == "target":
            result = self._target_batch(TargetBatch(message.request_id, *_items(message)), began)
            return (result.errors or result.verified or result.prefilled or result.skipped)[0]
        if isinstance(message, Release):
            self.core.release(message.seq_id)
            self.last_verified.pop(message.seq_id, None)
            return Released(message.seq_id, self.core.slots.active)
        if isinstance(message, Ping):
            return Pong(message.nonce, self.core.slots.active)
        raise ValueError(f"the {self.role} worker does not take {type(message).__name__} messages")

    # --- the target

    def _target_batch(self, batch: TargetBatch, began: float) -> TargetBatchResult:
        """Every item of the batch in one forward pass; each answered on its own."""
        items: list[PrefillChunk | VerifyRequest | VerifyNext] = []
        windows: list[Window] = []
        errors, skipped = [], []
        for item in batch_items(batch):
            try:
                check_request(item, self.runner.config.vocab_size, self.runner.max_seq_len)
                window = self._window(item)
            except ITEM_ERRORS as error:
                errors.append(_error(item, error))
                continue
            if window is None:
                skipped.append(Skipped(item.request_id, item.seq_id))
            else:
                items.append(item)
                windows.append(window)
        prefilled, verified = [], []
        verdicts = self.core.verify_batch(windows) if windows else []
        busy_s = time.perf_counter() - began
        for item, verdict in zip(items, verdicts):
            if isinstance(verdict, Exception):
                errors.append(_error(item, verdict))
            elif isinstance(verdict, Verdict):
                self.last_verified[item.seq_id] = (item.request_id, verdict)
                verified.append(VerifyResult(item.request_id, item.seq_id, verdict.accepted, verdict.next_token,
                                             verdict.cached, busy_s))
            else:
                prefilled.append(Prefilled(item.request_id, item.seq_id, verdict))
        rows = sum(len(window.feed) for window in windows)
        return TargetBatchResult(batch.request_id, prefilled, verified, skipped, errors, rows, busy_s)

    def _window(self, item: PrefillChunk | VerifyRequest | VerifyNext) -> Window | None:
        """What the item asks of the target pass; None for a VerifyNext none of whose outcomes happened."""
        if isinstance(item, PrefillChunk):
            return Window(item.seq_id, item.start, item.feed, prompt=True, final=False)
        if isinstance(item, VerifyRequest):
            return Window(item.seq_id, item.start, item.feed, item.drafted, item.sampling, item.probs,
                          prompt=item.prompt)
        # a VerifyNext continues the sequence's last verification with the branch drafted for its outcome
        last_id, verdict = self.last_verified.get(item.seq_id, (None, None))
        if last_id != item.after:
            raise ValueError(f"sequence {item.seq_id}: VerifyNext follows request {item.after}, but the last "
                             f"verification of it was {last_id}")
        outcome = (verdict.accepted, verdict.next_token)
        branch = next((i for i, key in enumerate(zip(item.accepted, item.next_tokens)) if key == outcome), None)
        if branch is None:
            return None
        window = item.windows[branch]
        probs = None
        if item.probs is not None:
            first = sum(len(w) for w in item.windows[:branch])
            probs = item.probs[first : first + len(window)]
        return Window(item.seq_id, verdict.cached, [verdict.next_token] + window, len(window), item.sampling, probs)

    # --- the draft

    def _draft_batch(self, batch: DraftBatch, began: float) -> DraftBatchResult:
        errors: list[ErrorReply] = []
        drafts = self._checked(batch.drafts, errors)
        speculations = self._checked(batch.speculations, errors)
        outcome = self.core.draft_batch(
            [DraftJob(m.seq_id, m.start, m.feed, m.count, m.sampling, m.alternatives) for m in drafts],
            [SpeculateJob(m.seq_id, m.start, m.feed, m.forks, m.heads, m.bonus_guesses, m.count, m.sampling,
                          m.alternatives) for m in speculations])
        busy_s = time.perf_counter() - began
        drafted, speculated = [], []
        for message, made in zip(drafts, outcome.drafted):
            if isinstance(made, Exception):
                errors.append(_error(message, made))
            else:
                drafted.append(_drafted(message, made, busy_s))
        for message, made in zip(speculations, outcome.speculated):
            if isinstance(made, Exception):
                errors.append(_error(message, made))
            else:
                speculated.append(_speculated(message, made, busy_s))
        return DraftBatchResult(batch.request_id, drafted, speculated, errors, outcome.rows, outcome.steps, busy_s)

    def _checked(self, requests: list, errors: list[ErrorReply]) -> list:
        kept = []
        for request in requests:
            try:
                check_request(request, self.runner.config.vocab_size, self.runner.max_seq_len)
                kept.append(request)
            except ITEM_ERRORS as error:
                errors.append(_error(request, error))
        return kept


def _items(message: VerifyRequest | PrefillChunk | VerifyNext) -> tuple[list, list, list]:
    """A single request as the one item of a TargetBatch: (prefills, verifies, continues)."""
    if isinstance(message, PrefillChunk):
        return [message], [], []
    if isinstance(message, VerifyRequest):
        return [], [message], []
    return [], [], [message]


def _error(item: object, error: Exception) -> ErrorReply:
    return ErrorReply(item.request_id, f"{type(error).__name__}: {error}", fatal=False)


def _drafted(message: DraftRequest, draft: Draft, busy_s: float) -> DraftResult:
    return DraftResult(message.request_id, message.seq_id, draft.tokens, draft.probs, draft.alternatives,
                       draft.cached, busy_s)


def _speculated(message: SpeculateRequest, branches: Branches, busy_s: float) -> SpeculateResult:
    return SpeculateResult(message.request_id, message.seq_id, branches.heads, branches.tokens, branches.probs,
                           branches.alternatives, branches.cached, busy_s)
