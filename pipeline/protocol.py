"""Every message that crosses a specpipe socket, and nothing else.

A message is a small frozen dataclass. On the wire it is a msgpack map
{"v": PROTOCOL_VERSION, "type": <class name>, "body": {field: value}} holding only msgpack's own
types (no pickle, no extension types). `decode` checks the size, version, type name and every
field's type before building the object, and raises ProtocolError otherwise.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

import msgpack
import torch

from workers.sampling import SamplingParams as Sampling

PROTOCOL_VERSION = 2
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # draft distributions of a long window at a large vocabulary fit well inside


class ProtocolError(ValueError):
    """A message that is malformed, too large, of an unknown type or of another protocol version."""


# --- messages -----------------------------------------------------------------------------------


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
    probs: bytes | None  # float32 [len(tokens), vocab] when sampling; None when greedy
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
    probs: bytes | None  # float32 [branches, count, vocab] when sampling
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
    probs: bytes | None = None  # the draft's float32 [drafted, vocab] distributions, when sampling
    sampling: Sampling = field(default_factory=Sampling)


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
    probs: bytes | None = None  # float32 [total window tokens, vocab], branch after branch, when sampling
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class Skipped:
    """The verification's outcome was none of VerifyNext's branches: nothing was read."""

    request_id: int
    seq_id: int


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
    """Coordinator -> worker: read your clock (see pipeline.tracing for how offsets are estimated)."""

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
                VerifyResult, VerifyNext, Skipped, Release, Released, Ping, Pong,
                ClockProbe, ClockReading, TraceStart, TraceStarted, TraceCollect, TraceSpans, Shutdown, ErrorReply)
}
Message = typing.Union[tuple(MESSAGE_TYPES.values())]  # type: ignore[valid-type]
MAX_TRACE_SPANS = 400_000  # a TraceSpans message of this many stays well inside MAX_MESSAGE_BYTES


def request_kind(request: object) -> tuple[str, int]:
    """What a request asks of a worker, as (kind, size): ("draft", tokens asked), ("speculate",
    branches), ("chained", branches), ("verify", tokens drafted), ("decode", 0) for one token without a proposal, ("prefill",
    tokens read), or the message's own name and 0."""
    if isinstance(request, DraftRequest):
        return "draft", request.count
    if isinstance(request, SpeculateRequest):
        return "speculate", len(request.heads) + request.bonus_guesses  # branches drafted
    if isinstance(request, VerifyNext):
        return "chained", len(request.windows)  # branches it may continue with
    if isinstance(request, VerifyRequest):
        if request.drafted:
            return "verify", request.drafted
        return ("decode", 0) if len(request.feed) == 1 else ("prefill", len(request.feed))
    return type(request).__name__.lower(), 0


# --- tensors as bytes ---------------------------------------------------------------------------


def tensor_to_bytes(tensor: torch.Tensor | None) -> bytes | None:
    return None if tensor is None else tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def bytes_to_tensor(data: bytes | None, rows: int, columns: int) -> torch.Tensor | None:
    if data is None:
        return None
    if len(data) != rows * columns * 4:
        raise ProtocolError(f"expected {rows}x{columns} float32 values, got {len(data)} bytes")
    return torch.frombuffer(bytearray(data), dtype=torch.float32).view(rows, columns)


# --- encoding and validation --------------------------------------------------------------------


def _to_wire(value: object) -> object:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return [_to_wire(item) for item in value]
    return value


def encode(message: object) -> bytes:
    name = type(message).__name__
    if MESSAGE_TYPES.get(name) is not type(message):
        raise TypeError(f"{name} is not a protocol message")
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": name, "body": _to_wire(message)}, use_bin_type=True)


def decode(data: bytes) -> object:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, use_list=True, max_buffer_size=MAX_MESSAGE_BYTES, ext_hook=_refuse_extension
    )
    try:
        unpacker.feed(data)
        envelope = unpacker.unpack()
        if unpacker.tell() != len(data):
            raise ProtocolError(f"{len(data) - unpacker.tell()} stray bytes after the message")
    except ProtocolError:
        raise
    except Exception as error:  # msgpack raises several types for truncated or garbage input
        raise ProtocolError(f"not a msgpack message: {type(error).__name__}: {error}") from None
    if not isinstance(envelope, dict) or set(envelope) != {"v", "type", "body"}:
        raise ProtocolError("message must be a map with exactly the keys v, type and body")
    if envelope["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {_clip(envelope['v'])} is not {PROTOCOL_VERSION} (mixed specpipe versions?)"
        )
    cls = MESSAGE_TYPES.get(envelope["type"]) if isinstance(envelope["type"], str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_clip(envelope['type'])}")
    return _build(cls, envelope["body"], envelope["type"])


def _clip(value: object, limit: int = 80) -> str:
    """repr of a value from the wire, cut short: an error message must not echo megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _refuse_extension(code: int, data: bytes) -> object:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def _build(cls: type, body: object, where: str) -> object:
    return _VALIDATORS[cls](body, where)


def _compile(cls: type):
    """A function that checks a decoded map against `cls`'s fields and builds it (made once per class)."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _checker(hints[f.name]),
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
              for f in dataclasses.fields(cls)]
    names = {name for name, _, _ in fields}

    def build(body: object, where: str) -> object:
        if not isinstance(body, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(body).__name__}")
        if not body.keys() <= names:
            raise ProtocolError(f"{where}: unknown field(s) {_clip(sorted(map(str, body.keys() - names)))}")
        values = {}
        for name, check, required in fields:
            if name in body:
                values[name] = check(body[name], f"{where}.{name}")
            elif required:
                raise ProtocolError(f"{where}: missing field {name!r}")
        return cls(**values)

    return build


def _checker(expected: object):
    """A function (value, where) -> value that raises ProtocolError unless value has type `expected`."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [option for option in typing.get_args(expected) if option is not type(None)]
        check_inner = _checker(inner)
        return lambda value, where: None if value is None else check_inner(value, where)
    if origin is list:
        (item,) = typing.get_args(expected)
        if item is int:  # token lists: the hot path, checked in one pass
            def check_ints(value, where):
                if not isinstance(value, list) or not all(type(v) is int for v in value):
                    raise ProtocolError(f"{where}: expected a list of int")
                return value

            return check_ints
        check_item = _checker(item)

        def check_list(value, where):
            if not isinstance(value, list):
                raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
            return [check_item(element, f"{where}[]") for element in value]

        return check_list
    if dataclasses.is_dataclass(expected):
        return lambda value, where: _VALIDATORS[expected](value, where)

    def check_scalar(value, where):
        if expected is float and type(value) is int:
            return float(value)
        if type(value) is not expected:  # exact: bool is not an int here
            raise ProtocolError(f"{where}: expected {expected.__name__}, got {type(value).__name__}")
        return value

    return check_scalar


_VALIDATORS = {cls: _compile(cls) for cls in (*MESSAGE_TYPES.values(), Sampling, Span)}
