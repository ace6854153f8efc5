"""Only well-formed messages of this protocol version get through; nothing is ever unpickled."""

import pickle

import msgpack
import pytest
import torch

from pipeline.protocol import (
    PROTOCOL_VERSION,
    DraftRequest,
    Ready,
    ProtocolError,
    VerifyRequest,
    bytes_to_tensor,
    decode,
    encode,
    tensor_to_bytes,
)
from workers.sampling import SamplingParams


def wire(body, type_name="Ping", version=PROTOCOL_VERSION):
    return msgpack.packb({"v": version, "type": type_name, "body": body})


def test_round_trip_keeps_every_field():
    message = VerifyRequest(7, 3, 10, [1, 2, 3], 2, tensor_to_bytes(torch.ones(2, 4)), SamplingParams(0.7, 5, 0.9, 11))
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
    import pipeline.protocol as protocol

    monkeypatch.setattr(protocol, "MAX_MESSAGE_BYTES", 64)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(wire({"nonce": 1}) + b"\x00" * 100)


def test_distributions_travel_as_float32_bytes():
    probs = torch.softmax(torch.randn(3, 10), -1)
    assert torch.equal(bytes_to_tensor(tensor_to_bytes(probs), 3, 10), probs)
    with pytest.raises(ProtocolError, match="3x11"):
        bytes_to_tensor(tensor_to_bytes(probs), 3, 11)
