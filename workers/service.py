"""One worker's request handling, shared by the in-process path (tests) and the worker process."""

from __future__ import annotations

import time

from workers.draft import DraftCore
from workers.errors import SpecpipeError
from workers.model.runner_base import RunnerBase
from workers.protocol.messages import (
    ROLES,
    DraftRequest,
    DraftResult,
    ErrorReply,
    Ping,
    Pong,
    Release,
    Released,
    Skipped,
    SpeculateRequest,
    SpeculateResult,
    VerifyNext,
    VerifyRequest,
    VerifyResult,
)
from workers.request_checks import check_request
from workers.target import TargetCore, Verdict


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
        """The reply to `message`. Bad requests get a non-fatal ErrorReply; the worker keeps serving."""
        request_id = getattr(message, "request_id", -1)
        try:
            check_request(message, self.runner.config.vocab_size, self.runner.max_seq_len)
            return self._dispatch(message)
        except (ValueError, SpecpipeError) as error:
            return ErrorReply(request_id, f"{type(error).__name__}: {error}", fatal=False)

    def reset(self) -> None:
        """Frees every sequence: a new coordinator (Hello) starts with an empty cache."""
        for seq_id in self.core.slots.held:
            self.core.release(seq_id)
        self.last_verified.clear()

    def _dispatch(self, message: object) -> object:
        began = time.perf_counter()
        if isinstance(message, DraftRequest) and self.role == "draft":
            draft = self.core.draft(message.seq_id, message.start, message.feed, message.count, message.sampling,
                                    message.alternatives)
            return DraftResult(message.request_id, message.seq_id, draft.tokens, draft.probs,
                               draft.alternatives, draft.cached, time.perf_counter() - began)
        if isinstance(message, SpeculateRequest) and self.role == "draft":
            branches = self.core.speculate(message.seq_id, message.start, message.feed, message.forks, message.heads,
                                           message.bonus_guesses, message.count, message.sampling,
                                           message.alternatives)
            return SpeculateResult(message.request_id, message.seq_id, branches.heads, branches.tokens,
                                   branches.probs, branches.alternatives, branches.cached,
                                   time.perf_counter() - began)
        if isinstance(message, VerifyRequest) and self.role == "target":
            return self._verify(message.request_id, message.seq_id, message.start, message.feed, message.drafted,
                                message.sampling, message.probs, began)
        if isinstance(message, VerifyNext) and self.role == "target":
            return self._verify_next(message, began)
        if isinstance(message, Release):
            self.core.release(message.seq_id)
            self.last_verified.pop(message.seq_id, None)
            return Released(message.seq_id, self.core.slots.active)
        if isinstance(message, Ping):
            return Pong(message.nonce, self.core.slots.active)
        raise ValueError(f"the {self.role} worker does not take {type(message).__name__} messages")

    def _verify(self, request_id: int, seq_id: int, start: int, feed: list[int], drafted: int, sampling,
                probs, began: float) -> VerifyResult:
        verdict = self.core.verify(seq_id, start, feed, drafted, sampling, probs)
        self.last_verified[seq_id] = (request_id, verdict)
        return VerifyResult(request_id, seq_id, verdict.accepted, verdict.next_token, verdict.cached,
                            time.perf_counter() - began)

    def _verify_next(self, message: VerifyNext, began: float) -> VerifyResult | Skipped:
        """Continues the sequence's last verification with the branch drafted for its outcome."""
        last_id, verdict = self.last_verified.get(message.seq_id, (None, None))
        if last_id != message.after:
            raise ValueError(f"sequence {message.seq_id}: VerifyNext follows request {message.after}, but the "
                             f"last verification of it was {last_id}")
        outcome = (verdict.accepted, verdict.next_token)
        branch = next((i for i, key in enumerate(zip(message.accepted, message.next_tokens)) if key == outcome), None)
        if branch is None:
            return Skipped(message.request_id, message.seq_id)
        window = message.windows[branch]
        probs = None
        if message.probs is not None:
            first = sum(len(w) for w in message.windows[:branch])
            probs = message.probs[first : first + len(window)]
        return self._verify(message.request_id, message.seq_id, verdict.cached, [verdict.next_token] + window,
                            len(window), message.sampling, probs, began)
