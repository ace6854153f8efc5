"""Garbage at a live worker and at the coordinator's decoder: no crash, no hang, the worker keeps serving."""

import dataclasses
import subprocess
import sys
import time
import typing

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import WorkerFailed
from pipeline.transport import ZmqTransport
from tests.pipeline.fuzz_corpus import ODD_TENSORS, is_shutdown, payloads
from workers.models import DRAFT_DIR
from workers.protocol.codec import ProtocolError, decode, encode
from workers.protocol.limits import MAX_MESSAGE_BYTES
from workers.protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    DraftRequest,
    DraftResult,
    ErrorReply,
    Hello,
    Ping,
    Pong,
    Ready,
    VerifyRequest,
)
from workers.sampling import SamplingParams

MUTATED = 12_000  # messages of the seeded mutation loop, per target
REPLY_TIMEOUT_MS = 10_000  # a reply slower than this is a hang

# --- structure-aware messages (hypothesis) -------------------------------------------------------

ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
SMALL_INT = st.integers(-3, 300) | st.integers(-(2**63), 2**64 - 1)


def _typed(hint) -> st.SearchStrategy:
    """Values of roughly the declared type (with edge values), so that range checks get exercised."""
    if hint is int:
        return SMALL_INT
    if hint is float:
        return st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2, 2)
    if hint is str:
        return st.text(max_size=12)
    if hint is bool:
        return st.booleans()
    if typing.get_origin(hint) is list:
        return st.lists(SMALL_INT, max_size=6)
    if hint is SamplingParams:
        return st.fixed_dictionaries({f.name: _typed(typing.get_type_hints(SamplingParams)[f.name])
                                      for f in dataclasses.fields(SamplingParams)})
    return st.none() | st.binary(max_size=16)


@st.composite
def structured(draw) -> bytes:
    name = draw(st.sampled_from(sorted(set(MESSAGE_TYPES) - {"Shutdown"})) | st.text(max_size=10))
    cls = MESSAGE_TYPES.get(name)
    body = {}
    if cls is not None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if draw(st.integers(0, 9)):  # usually present; sometimes missing
                body[f.name] = draw(_typed(hints[f.name]) if draw(st.integers(0, 4)) else ANY)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=6))] = draw(ANY)
    version = draw(st.sampled_from([PROTOCOL_VERSION] * 4 + [PROTOCOL_VERSION + 1, 0]))
    return msgpack.packb({"v": version, "type": name, "body": body}, use_bin_type=True)


# --- a live worker ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    address = f"ipc://{directory}/draft.sock"
    log = (directory / "worker.log").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker", "--role", "draft", "--checkpoint",
                                str(DRAFT_DIR), "--bind", address, "--slots", "4", "--max-seq-len", "256"],
                               stderr=log, stdin=subprocess.DEVNULL)
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    socket.send(encode(Hello(0)))
    assert isinstance(reply(socket, timeout_ms=120_000), Ready)
    yield process, socket, address, log
    socket.close(0)
    context.term()
    process.terminate()
    process.wait(10)
    log.close()


def reply(socket: zmq.Socket, timeout_ms: int = REPLY_TIMEOUT_MS) -> object:
    assert socket.poll(timeout_ms), "no reply: the worker hangs"
    return decode(socket.recv())  # whatever a worker sends is a valid message


def assert_serves(process, socket) -> None:
    """The worker is alive and answers a valid request after a reset (Hello frees every slot)."""
    assert process.poll() is None, "the worker died"
    socket.send(encode(Hello(0)))
    assert isinstance(reply(socket), Ready)
    socket.send(encode(DraftRequest(1, 0, 0, [1, 2, 3], 2)))
    result = reply(socket)
    assert isinstance(result, DraftResult) and len(result.tokens) == 2, result


@pytest.mark.slow
def test_mutated_messages_at_a_live_worker(worker):
    process, socket, _, log = worker
    window = 64  # in flight at once: keeps the socket busy without round-trip waits
    errors = sent = 0
    batch = []
    for payload in payloads(MUTATED, seed=1):
        batch.append(payload)
        if len(batch) == window:
            for item in batch:
                socket.send(item)
            for _ in batch:
                errors += isinstance(reply(socket), ErrorReply)
            sent += len(batch)
            batch = []
    assert sent >= 10_000 and errors > 0.9 * sent
    assert_serves(process, socket)
    log.flush()
    log.seek(0)
    assert log.read().count("dropped a bad message") >= 0.9 * sent


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=structured())
def test_structured_messages_at_a_live_worker(worker, payload):
    process, socket, _, _ = worker
    if is_shutdown(payload):
        return
    socket.send(payload)
    reply(socket)
    assert process.poll() is None


@pytest.mark.slow
@pytest.mark.parametrize("tensor", ODD_TENSORS, ids=lambda t: str(t["shape"]))
def test_a_tensor_no_message_could_fill_is_refused_and_the_worker_goes_on(worker, tensor):
    # [0, 2**64 - 1] with no bytes passed the size check, and torch.zeros raised out of the worker's loop
    process, socket, _, _ = worker
    seed = msgpack.unpackb(encode(VerifyRequest(7, 0, 0, [1, 2], 1, torch.full((1, 8), 0.125), SamplingParams(0.8))))
    seed["body"]["probs"] = tensor
    socket.send(msgpack.packb(seed, use_bin_type=True))
    answer = reply(socket)
    assert isinstance(answer, ErrorReply) and "probs" in answer.message
    assert_serves(process, socket)


@pytest.mark.slow
def test_oversized_and_multipart_messages_are_dropped(worker):
    process, _, address, log = worker
    context = zmq.Context()
    client = context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(address)
    client.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))  # libzmq closes the connection; the client reconnects
    client.send_multipart([encode(Ping(1)), b"second frame"])  # not one frame: ignored
    time.sleep(0.5)
    client.send(encode(Ping(2)))
    pong = reply(client)
    assert isinstance(pong, Pong) and pong.nonce == 2
    client.close(0)
    context.term()
    assert process.poll() is None
    log.flush()
    log.seek(0)
    assert "sent a message over the size limit" in log.read()


# --- the coordinator's decoder ------------------------------------------------------------------


def test_decoder_refuses_mutations_with_protocol_error_only():
    began = time.perf_counter()
    refused = 0
    for payload in payloads(MUTATED, seed=2):
        try:
            decode(payload)
        except ProtocolError as error:
            refused += 1
            assert len(str(error)) < 500  # never echoes a payload back
    assert refused > 0.9 * MUTATED
    assert time.perf_counter() - began < 30


@settings(max_examples=3000, deadline=1000)
@given(payload=structured() | st.binary(max_size=200))
def test_decoder_structured(payload):
    try:
        decode(payload)
    except ProtocolError:
        pass


def test_decoder_refuses_deep_nesting_and_huge_headers():
    for payload in (b"\x91" * 100_000, b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"):
        with pytest.raises(ProtocolError):
            decode(payload)


@pytest.mark.slow
def test_a_worker_sending_garbage_fails_the_coordinator_with_its_name(tmp_path):
    context = zmq.Context()
    fake = context.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/fake.sock"
    fake.bind(address)
    transport = ZmqTransport({"target": address})
    try:
        transport.submit("target", Ping(1))
        assert fake.poll(5000)
        identity, _ = fake.recv_multipart()
        fake.send_multipart([identity, b"\xc1garbage"])
        with pytest.raises(WorkerFailed, match=r"\[target\].*malformed message"):
            for _ in range(20):
                transport.wait(0.25)
    finally:
        transport.close()
        fake.close(0)
        context.term()
