"""Random and mutated protocol messages for the fuzz tests, grown from an example of every message type:
seeded, fast, never a Shutdown."""

from __future__ import annotations

import random
from collections.abc import Iterator

import msgpack
import torch

from workers.protocol.codec import ProtocolError, decode, encode
from workers.protocol.messages import (
    PROTOCOL_VERSION,
    ClockProbe,
    ClockReading,
    DraftBatch,
    DraftBatchResult,
    DraftRequest,
    DraftResult,
    ErrorReply,
    Hello,
    Ping,
    Pong,
    PrefillChunk,
    Prefilled,
    Ready,
    Release,
    Released,
    Shutdown,
    Skipped,
    Span,
    SpeculateRequest,
    SpeculateResult,
    TargetBatch,
    TargetBatchResult,
    TraceCollect,
    TraceSpans,
    TraceStart,
    TraceStarted,
    VerifyNext,
    VerifyRequest,
    VerifyResult,
)
from workers.sampling import SamplingParams

_SAMPLED = SamplingParams(0.8, 5, 0.9, 3)
_VERIFY = VerifyRequest(6, 0, 0, [1, 2, 3], 1, torch.full((1, 8), 0.125), SamplingParams(0.8))
_DRAFTED = DraftResult(1, 0, [5, 6], torch.full((2, 8), 0.125), [[7], [8]], 4, 0.001)
_SPECULATED = SpeculateResult(4, 0, [5], [[6, 7]], torch.full((1, 2, 8), 0.125), [[[1], [2]]], 3, 0.002)
_VERIFIED = VerifyResult(3, 0, 1, 9, 5, 0.003)

# one of every message (what a worker answers, too: a peer may send anything), the Shutdown left out
EXAMPLES = [
    Hello(1), Ready("draft", 1, "m", 10, "h", 10, [0], "torch", "cpu", 1),
    DraftRequest(1, 0, 0, [1, 2, 3], 1), DraftRequest(2, 1, 0, [7], 2, _SAMPLED), _DRAFTED,
    SpeculateRequest(4, 0, 0, [1, 2, 3], [1], [5], 2, 2), SpeculateRequest(5, 0, 0, [1], [0], [5], 1, 2, _SAMPLED),
    _SPECULATED, VerifyRequest(3, 0, 0, [1, 2, 3], 1), _VERIFY, _VERIFIED,
    VerifyNext(5, 0, 3, [0, 1], [4, 6], [[7], [8, 9]]), Skipped(5, 0),
    PrefillChunk(7, 1, 0, [1, 2, 3, 4]), Prefilled(7, 1, 4),
    TargetBatch(8, [PrefillChunk(8, 1, 0, [1, 2])], [_VERIFY], [VerifyNext(9, 0, 6, [0], [4], [[7]])]),
    TargetBatchResult(8, [Prefilled(8, 1, 2)], [_VERIFIED], [Skipped(9, 0)], [ErrorReply(10, "x", False)], 3, 0.01),
    DraftBatch(11, [DraftRequest(12, 0, 0, [1, 2], 2)], [SpeculateRequest(13, 1, 0, [1], [0], [5], 1, 2)]),
    DraftBatchResult(11, [_DRAFTED], [_SPECULATED], [], 4, 2, 0.01),
    Release(3), Released(3, 0), Ping(1), Pong(1, 0), ClockProbe(1), ClockReading(1, 2.5), TraceStart(16),
    TraceStarted(16), TraceCollect(), TraceSpans([Span("draft", "", 1.0, 0.5, 0, 2)], 0), ErrorReply(1, "x", False),
]
SEEDS = [encode(message) for message in EXAMPLES]
TENSOR_SEEDS = [seed for seed in SEEDS if b"float32" in seed]

# tensor maps a sender could make up: dimensions past any message, empty bytes for an empty (or overflowing) shape
ODD_TENSORS = [{"shape": [0, 2**64 - 1], "float32": b""}, {"shape": [2**63 - 1, 0], "float32": b""},
               {"shape": [0, 2**40, 2**40], "float32": b""}, {"shape": [2**31, 2**33], "float32": b""},
               {"shape": [1, -1], "float32": b""}, {"shape": [], "float32": b""}, {"shape": [1, 1, 1, 1], "float32": b""},
               {"shape": [1, 2], "float32": b"\0" * 7}, {"shape": [1.0], "float32": b"\0" * 4},
               {"shape": [1], "float32": "abcd"}, {"shape": [1], "float32": b"\0" * 4, "x": 1}]

ODD_VALUES = [None, True, -1, 0, 2**63, -(2**63), 2**64 - 1, 1.5, float("nan"), float("inf"), "", "x" * 300, b"\0",
              [], {}, [1, "a"], {"k": "v"}, [[[[]]]]]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        position = rng.randrange(len(data) + 1)
        if choice == 0 and data:  # flip bits
            data[min(position, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif choice == 1:  # insert random bytes
            data[position:position] = rng.randbytes(rng.randint(1, 8))
        elif choice == 2:  # delete a run
            del data[position : position + rng.randint(1, 8)]
        elif choice == 3:  # truncate
            del data[position:]
        elif choice == 4 and data:  # overwrite with an interesting byte (msgpack type markers)
            data[min(position, len(data) - 1)] = rng.choice([0xC0, 0xC1, 0xC4, 0xD4, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF, 0x7F])
        else:  # splice another message in
            other = rng.choice(SEEDS)
            data[position:position] = other[: rng.randrange(len(other) + 1)]
    return bytes(data)


def _envelope(rng: random.Random) -> bytes:
    """A well-formed msgpack map shaped like a message, with something wrong inside (or not)."""
    seed = msgpack.unpackb(rng.choice(SEEDS))
    envelope = {"v": seed["v"], "type": seed["type"], "body": dict(seed["body"])}
    target = rng.randrange(6)
    if target == 5:  # a tensor field, anywhere in any message that carries one, with a shape no sender should make
        seed = msgpack.unpackb(rng.choice(TENSOR_SEEDS))
        envelope = {"v": seed["v"], "type": seed["type"], "body": seed["body"]}
        places = list(_tensor_places(envelope["body"]))
        holder, key = rng.choice(places)
        holder[key] = rng.choice(ODD_TENSORS)
    elif target == 0:
        envelope["v"] = rng.choice([PROTOCOL_VERSION + 1, 0, -1, "1", None, 1.0])
    elif target == 1:
        envelope["type"] = rng.choice(["Exec", "", "ping", "__class__", 7, None, "Shutdown ", "x" * 1000])
    elif target == 2 and envelope["body"]:
        envelope["body"][rng.choice(list(envelope["body"]))] = rng.choice(ODD_VALUES)
    elif target == 3:
        envelope["body"][rng.choice(["extra", "__init__", "seq_id"])] = rng.choice(ODD_VALUES)
    else:
        envelope[rng.choice(["x", "body", "v"])] = rng.choice(ODD_VALUES)
    return msgpack.packb(envelope, use_bin_type=True)


def _tensor_places(value: object):
    """(container, key) of every tensor map inside a decoded message body."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(item, dict) and "float32" in item:
            yield value, key
        else:
            yield from _tensor_places(item)


def payloads(count: int, seed: int = 0) -> Iterator[bytes]:
    """`count` payloads: a third random bytes, a third mutated messages, a third odd envelopes."""
    rng = random.Random(seed)
    made = 0
    while made < count:
        kind = rng.randrange(3)
        if kind == 0:
            payload = rng.randbytes(rng.randint(0, 64))
        elif kind == 1:
            payload = _mutate(rng, rng.choice(SEEDS))
        else:
            payload = _envelope(rng)
        if is_shutdown(payload):
            continue  # the one message that stops a worker by design
        made += 1
        yield payload


def is_shutdown(payload: bytes) -> bool:
    try:
        return isinstance(decode(payload), Shutdown)
    except ProtocolError:
        return False
