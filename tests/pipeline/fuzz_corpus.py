"""Random and mutated protocol messages for the fuzz tests: seeded, fast, never a Shutdown."""

from __future__ import annotations

import random
from collections.abc import Iterator

import msgpack
import torch

from workers.protocol.codec import ProtocolError, decode, encode
from workers.protocol.messages import (
    PROTOCOL_VERSION,
    DraftRequest,
    ErrorReply,
    Hello,
    Ping,
    Ready,
    Release,
    Shutdown,
    SpeculateRequest,
    VerifyNext,
    VerifyRequest,
)
from workers.sampling import SamplingParams

SEEDS = [
    encode(Ping(1)),
    encode(Release(3)),
    encode(Hello(1)),
    encode(DraftRequest(1, 0, 0, [1, 2, 3], 1)),
    encode(DraftRequest(2, 1, 0, [7], 2, SamplingParams(0.8, 5, 0.9, 3))),
    encode(VerifyRequest(3, 0, 0, [1, 2, 3], 1)),
    encode(VerifyRequest(6, 0, 0, [1, 2, 3], 1, torch.full((1, 8), 0.125), SamplingParams(0.8))),
    encode(SpeculateRequest(4, 0, 0, [1, 2, 3], [1], [5], 2, 2)),
    encode(VerifyNext(5, 0, 3, [0, 1], [4, 6], [[7], [8, 9]])),
    encode(Ready("draft", 1, "m", 10, "h", 10, [0], "torch", "cpu", 1)),
    encode(ErrorReply(1, "x", False)),
]

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
    if target == 5:  # a tensor field of a request that carries one, with a shape no sender should make
        seed = msgpack.unpackb(encode(VerifyRequest(7, 0, 0, [1, 2], 1, torch.full((1, 8), 0.125), SamplingParams(0.8))))
        envelope = {"v": seed["v"], "type": seed["type"], "body": dict(seed["body"])}
        envelope["body"]["probs"] = rng.choice(ODD_TENSORS)
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
