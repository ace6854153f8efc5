"""Only well-formed messages of this protocol version get through; nothing is ever unpickled."""

import pickle

import msgpack
import pytest
import torch

from workers.protocol.codec import ProtocolError, decode, encode
from workers.protocol.messages import PROTOCOL_VERSION, DraftRequest, Ready, SpeculateResult, VerifyRequest
from workers.sampling import SamplingParams


def wire(body, type_name="Ping", version=PROTOCOL_VERSION):
    return msgpack.packb({"v": version, "type": type_name, "body": body})


def test_round_trip_keeps_every_field():
    message = VerifyRequest(7, 3, 10, [1, 2, 3], 2, None, SamplingParams(0.7, 5, 0.9, 11))
    assert decode(encode(message)) == message
    ready = Ready("draft", 1, "m", 4096, "abc", 1024, [0], "torch", "cpu", 8)
    assert decode(encode(ready)) == ready


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "not a msgpack"),
        (b"\xc1", "not a msgpack"),
        (msgpack.packb([1, 2]), "map with exactly"),
        (wire({"nonce": 1}, version=99), "version 99"),
        (wire({"nonce": 1}, type_name="Exec"), "unknown message type"),
        (wire({"nonce": "1"}), "expected int"),
        (wire({"nonce": True}), "expected int"),
        (wire({}), "missing field"),
        (wire({"nonce": 1, "extra": 2}), "unknown field"),
        (wire({"request_id": 1, "seq_id": 1, "start": 0, "feed": [1, "x"], "count": 1}, "DraftRequest"), "feed"),
        (wire({"nonce": 1}) + b"\x00", "stray bytes"),
        (msgpack.packb({"v": 1, "type": "Ping", "body": {"nonce": msgpack.ExtType(1, b"x")}}), "extension"),
        (pickle.dumps(DraftRequest(1, 1, 0, [1], 1)), "stray bytes"),  # a pickle is never unpickled
    ],
)
def test_bad_messages_raise_protocol_error(payload, message):
    with pytest.raises(ProtocolError, match=message):
        decode(payload)


def test_oversized_message_is_refused(monkeypatch):
    import workers.protocol.limits as protocol

    monkeypatch.setattr(protocol, "MAX_MESSAGE_BYTES", 64)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(wire({"nonce": 1}) + b"\x00" * 100)


def test_distributions_travel_as_float32_tensors_of_their_own_shape():
    probs = torch.softmax(torch.randn(2, 3, 10, dtype=torch.float64), -1)  # any float dtype goes as float32
    received = decode(encode(SpeculateResult(1, 2, [5, 6], [[1, 2, 3]] * 2, probs, [[[]] * 3] * 2, 4, 0.5)))
    assert received.probs.dtype == torch.float32 and torch.equal(received.probs, probs.float())
    assert decode(encode(VerifyRequest(1, 2, 0, [3, 4], 1, torch.ones(1, 4)))).probs.shape == (1, 4)


@pytest.mark.parametrize("tensor, message", [
    ({"shape": [3, 10], "float32": b"\0" * 119}, "needs 120 bytes, got 119"),
    ({"shape": [3, -1], "float32": b""}, "ints from 0 to"),
    ({"shape": [0, 2**64 - 1], "float32": b""}, "ints from 0 to"),  # no bytes to fill, and torch raised on it
    ({"shape": [2**63 - 1, 0], "float32": b""}, "ints from 0 to"),
    ({"shape": [1] * 4, "float32": b"\0" * 4}, "1 to 3"),
    ({"shape": [1], "float32": "abcd"}, "got str"),
    ({"shape": [1], "float32": b"\0" * 4, "dtype": "float64"}, "exactly the keys"),
    (b"\0" * 4, "tensor map"),
])
def test_malformed_tensors_are_refused(tensor, message):
    body = {"request_id": 1, "seq_id": 2, "start": 0, "feed": [3, 4], "drafted": 1, "probs": tensor}
    with pytest.raises(ProtocolError, match=message):
        decode(wire(body, "VerifyRequest"))


def test_no_list_or_map_may_be_longer_than_a_message_can_use():
    # refused by the unpacker itself, before any of it is built (msgpack's own bounds were 64 M items)
    many = msgpack.packb({"v": 1, "type": "Ping", "body": {"request_id": 1, "pad": [0] * 2_000_000}})
    with pytest.raises(ProtocolError, match="not a msgpack message"):
        decode(many)
    wide = msgpack.packb({"v": 1, "type": "Ping", "body": {str(i): 0 for i in range(100)}})
    with pytest.raises(ProtocolError, match="not a msgpack message"):
        decode(wide)
