"""Every message that crosses a specpipe socket, and nothing else: small frozen dataclasses.

The worker side defines the protocol it serves, as a server defines its API; the coordinator
(`pipeline/`) is its client. This module holds the messages alone and imports no wire code, so the
scheduler and the worker cores can build and read them without touching msgpack or ZeroMQ; how they
travel (msgpack, versioned, validated on receipt) is `workers.protocol.codec`.

Distributions travel as tensors here (`Tensor | None` fields, float32 [rows, vocab] or
[branches, count, vocab]); the codec turns them into bytes and back, and nothing else does.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from torch import Tensor

from workers.sampling import SamplingParams as Sampling

PROTOCOL_VERSION = 5  # 5: position-keyed sampling (SamplingParams.reproducible); 4: batched requests (TargetBatch, DraftBatch) and prompt chunks; 3: typed tensors
ROLES = ("draft", "target")  # the two kinds of worker (Ready.role, `specpipe worker --role`)


@dataclass(frozen=True)
class Hello:
    """Coordinator -> worker, first: answered with Ready once the model is loaded."""

    coordinator_pid: int


@dataclass(frozen=True)
class Ready:
    """Worker -> coordinator once its model is loaded: who it is and what it runs."""

    role: str
    pid: int
    model: str
    vocab_size: int
    tokenizer_hash: str
    max_context: int
    eos_ids: list[int]
    backend: str
    device: str
    slots: int


@dataclass(frozen=True)
class DraftRequest:
    """Roll sequence `seq_id` back to `start` cached positions, read `feed`, propose `count` tokens."""

    request_id: int
    seq_id: int
    start: int
    feed: list[int]
    count: int
    sampling: Sampling = field(default_factory=Sampling)
    alternatives: int = 1  # how many runner-up tokens to report per drafted token


@dataclass(frozen=True)
class DraftResult:
    request_id: int
    seq_id: int
    tokens: list[int]
    probs: Tensor | None  # [len(tokens), vocab] when sampling; None when greedy
    alternatives: list[list[int]]  # per token, the draft's next choices there, likeliest first (guesses at a correction)
    cached: int
    busy_s: float


@dataclass(frozen=True)
class SpeculateRequest:
    """Roll back to `start`, read `feed`: the context C. Then draft `count` tokens for every branch at
    once: branch i continues C[:forks[i]] + [heads[i]] (the verification in flight rejected at that
    position, corrected to heads[i]); `bonus_guesses` more continue C and the draft's own likeliest
    next tokens (guesses at the target's bonus token). The cache holds C again afterwards, or less
    (see SpeculateResult.cached)."""

    request_id: int
    seq_id: int
    start: int
    feed: list[int]
    forks: list[int]
    heads: list[int]
    bonus_guesses: int
    count: int
    sampling: Sampling = field(default_factory=Sampling)
    alternatives: int = 1


@dataclass(frozen=True)
class SpeculateResult:
    request_id: int
    seq_id: int
    heads: list[int]  # per branch (the requested ones, then the bonus guesses), the token it starts from
    tokens: list[list[int]]  # per branch, its `count` drafted tokens
    probs: Tensor | None  # [branches, count, vocab] when sampling
    alternatives: list[list[list[int]]]  # per branch and drafted token, the draft's next choices
    cached: int  # positions of C the cache still holds
    busy_s: float


@dataclass(frozen=True)
class VerifyRequest:
    """Roll back to `start`, read `feed` in one pass; its last `drafted` tokens are the proposal."""

    request_id: int
    seq_id: int
    start: int
    feed: list[int]
    drafted: int
    probs: Tensor | None = None  # the draft's [drafted, vocab] distributions, when sampling
    sampling: Sampling = field(default_factory=Sampling)
    prompt: bool = False  # feed is (the last chunk of) the prompt: the pass may take the prefill kernel


@dataclass(frozen=True)
class PrefillChunk:
    """Read `feed`, a chunk of the prompt before its last one, at `start`: nothing is proposed or answered
    but how much is cached (the prompt's last chunk is a VerifyRequest with `prompt` set)."""

    request_id: int
    seq_id: int
    start: int
    feed: list[int]


@dataclass(frozen=True)
class Prefilled:
    request_id: int
    seq_id: int
    cached: int


@dataclass(frozen=True)
class VerifyResult:
    request_id: int
    seq_id: int
    accepted: int
    next_token: int
    cached: int
    busy_s: float


@dataclass(frozen=True)
class VerifyNext:
    """Sent while verification `after` of the sequence runs: when it is done, verify at once the window
    drafted ahead for the outcome it had, with no round trip to the coordinator in between. Branch i is
    the outcome "accepted[i] drafted tokens kept, then next_tokens[i]", and windows[i] was drafted for it.
    Answered by a VerifyResult for that window, or by Skipped when no branch is the outcome."""

    request_id: int
    seq_id: int
    after: int  # the request_id of the verification this one follows
    accepted: list[int]
    next_tokens: list[int]
    windows: list[list[int]]
    probs: Tensor | None = None  # [total window tokens, vocab], branch after branch, when sampling
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class Skipped:
    """The verification's outcome was none of VerifyNext's branches: nothing was read."""

    request_id: int
    seq_id: int


@dataclass(frozen=True)
class TargetBatch:
    """Work for several sequences in one target pass (continuous batching), each in its own KV slot at its own
    positions: prompt chunks, windows to verify (0 drafted tokens = a plain decode step), or windows that
    continue verifications of the batch before it (VerifyNext). Answered by one TargetBatchResult that says
    per sequence what happened; a sequence's bad request fails it alone."""

    request_id: int
    prefills: list[PrefillChunk]
    verifies: list[VerifyRequest]
    continues: list[VerifyNext]


@dataclass(frozen=True)
class TargetBatchResult:
    request_id: int
    prefilled: list[Prefilled]
    verified: list[VerifyResult]
    skipped: list[Skipped]  # continues whose verification had none of their outcomes
    errors: list[ErrorReply]  # per failed item, with the item's request_id
    rows: int  # rows of the pass (the cost grows with them)
    busy_s: float


@dataclass(frozen=True)
class DraftBatch:
    """Drafting for several sequences at once: every running sequence advances by one drafted token per
    pass, each speculation's branches being scratch rows of the same pass. Answered by DraftBatchResult."""

    request_id: int
    drafts: list[DraftRequest]
    speculations: list[SpeculateRequest]


@dataclass(frozen=True)
class DraftBatchResult:
    request_id: int
    drafted: list[DraftResult]
    speculated: list[SpeculateResult]
    errors: list[ErrorReply]
    rows: int  # rows of all its passes
    steps: int  # passes
    busy_s: float


@dataclass(frozen=True)
class Release:
    """The sequence is finished or cancelled: free its KV slot. Answered by Released."""

    seq_id: int


@dataclass(frozen=True)
class Released:
    seq_id: int
    active: int  # sequences the worker still holds


@dataclass(frozen=True)
class Ping:
    nonce: int


@dataclass(frozen=True)
class Pong:
    nonce: int
    active: int


@dataclass(frozen=True)
class Shutdown:
    reason: str = ""


@dataclass(frozen=True)
class ClockProbe:
    """Coordinator -> worker: read your clock (the coordinator estimates the offset NTP-style)."""

    nonce: int


@dataclass(frozen=True)
class ClockReading:
    nonce: int
    clock_s: float  # the worker's time.perf_counter() when it answered


@dataclass(frozen=True)
class TraceStart:
    """Coordinator -> worker: forget earlier spans and record up to `capacity` from now on."""

    capacity: int


@dataclass(frozen=True)
class TraceStarted:
    capacity: int


@dataclass(frozen=True)
class Span:
    """One timed piece of a process's work, on that process's perf_counter clock (not a message)."""

    name: str  # "idle", "recv", "unpack", "draft", "verify", "decode", "pack", "send", ...
    lane: str  # the track within the process: "" for a worker's one loop
    start_s: float
    duration_s: float
    seq_id: int  # -1 when not about one sequence
    size: int  # tokens drafted, verified or read; 0 when none


@dataclass(frozen=True)
class TraceCollect:
    """Coordinator -> worker: stop recording and send the spans."""


@dataclass(frozen=True)
class TraceSpans:
    spans: list[Span]
    dropped: int  # spans not recorded because `capacity` was reached


@dataclass(frozen=True)
class ErrorReply:
    """A request failed (request_id -1 when the request itself was unreadable)."""

    request_id: int
    message: str
    fatal: bool


MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (Hello, Ready, DraftRequest, DraftResult, SpeculateRequest, SpeculateResult, VerifyRequest,
                VerifyResult, VerifyNext, Skipped, PrefillChunk, Prefilled, TargetBatch, TargetBatchResult, DraftBatch,
                DraftBatchResult, Release, Released, Ping, Pong,
                ClockProbe, ClockReading, TraceStart, TraceStarted, TraceCollect, TraceSpans, Shutdown, ErrorReply)
}
Message = typing.Union[tuple(MESSAGE_TYPES.values())]  # type: ignore[valid-type]


def request_kind(request: object) -> tuple[str, int]:
    """What a request asks of a worker, as (kind, size): ("draft", tokens asked), ("speculate",
    branches), ("chained", branches), ("verify", tokens drafted), ("decode", 0) for one token without a
    proposal, ("prefill", tokens read), or the message's own name and 0. A batch is named by the most any
    of its items asks (a batch with a drafted token is a "verify"), its size summed over them."""
    if isinstance(request, DraftRequest):
        return "draft", request.count
    if isinstance(request, SpeculateRequest):
        return "speculate", len(request.heads) + request.bonus_guesses  # branches drafted
    if isinstance(request, VerifyNext):
        return "chained", len(request.windows)  # branches it may continue with
    if isinstance(request, TargetBatch):  # named by the most a pass does: its cost grows with its rows
        items = [*request.prefills, *request.verifies]
        drafted = sum(r.drafted for r in request.verifies)
        if not items:
            return "chained", sum(len(r.windows) for r in request.continues)
        if drafted or request.continues:
            return "verify", drafted + sum(max(map(len, r.windows), default=0) for r in request.continues)
        if request.prefills or any(len(r.feed) > 1 for r in items):
            return "prefill", sum(len(r.feed) for r in items)
        return "decode", 0
    if isinstance(request, DraftBatch):
        if request.speculations:
            return "speculate", sum(len(r.heads) + r.bonus_guesses for r in request.speculations)
        return "draft", max((r.count for r in request.drafts), default=0)
    if isinstance(request, PrefillChunk):
        return "prefill", len(request.feed)
    if isinstance(request, VerifyRequest):
        if request.drafted:
            return "verify", request.drafted
        return ("decode", 0) if len(request.feed) == 1 else ("prefill", len(request.feed))
    return type(request).__name__.lower(), 0


def batch_items(batch: TargetBatch | DraftBatch) -> list:
    """A batch's items (each a request for one sequence), in the order the worker serves them."""
    if isinstance(batch, TargetBatch):
        return [*batch.prefills, *batch.verifies, *batch.continues]
    return [*batch.drafts, *batch.speculations]


def request_sequence(request: object) -> int:
    """The sequence a request is for: its seq_id, a batch's one sequence, or -1 (a batch of several, or none)."""
    if not isinstance(request, (TargetBatch, DraftBatch)):
        return getattr(request, "seq_id", -1)
    seq_ids = {item.seq_id for item in batch_items(request)}
    return next(iter(seq_ids)) if len(seq_ids) == 1 else -1
