"""Garbage at a live worker and at the coordinator's decoder: no crash, no hang, the worker keeps serving."""

import contextlib
import dataclasses
import subprocess
import sys
import time
import typing
from collections.abc import Iterator

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import WorkerFailed
from pipeline.runtime.transport import ZmqTransport
from tests.pipeline.fuzz_corpus import EXAMPLES, ODD_TENSORS, is_shutdown, payloads
from workers.bundled import DRAFT_DIR, TARGET_DIR
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
    Ready,
    VerifyRequest,
    VerifyResult,
)
from workers.sampling import SamplingParams

MUTATED = 10_240  # messages of the seeded mutation loop, per worker
STRUCTURED = 600  # hypothesis's messages, per worker
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


@pytest.fixture(scope="module", params=["draft", "target"])
def worker(request, tmp_path_factory):
    role = request.param
    directory = tmp_path_factory.mktemp(f"fuzz-{role}")
    address = f"ipc://{directory}/{role}.sock"
    log = (directory / "worker.log").open("w+")
    checkpoint = DRAFT_DIR if role == "draft" else TARGET_DIR
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "worker", "--role", role, "--checkpoint",
                                str(checkpoint), "--bind", address, "--slots", "4", "--max-seq-len", "256"],
                               stderr=log, stdin=subprocess.DEVNULL)
    with peer(address) as socket:
        socket.send(encode(Hello(0)))
        assert isinstance(reply(socket, timeout_ms=120_000), Ready)
        yield LiveWorker(role, process, socket, address, log)
    process.terminate()
    process.wait(10)
    log.close()


@dataclasses.dataclass
class LiveWorker:
    role: str
    process: subprocess.Popen
    socket: zmq.Socket  # the owner's: it said Hello
    address: str
    log: typing.TextIO

    def logged(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()


@contextlib.contextmanager
def peer(address: str) -> Iterator[zmq.Socket]:
    """A DEALER connected to a worker, as a coordinator's is."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    try:
        yield socket
    finally:
        socket.close(0)
        context.term()


def reply(socket: zmq.Socket, timeout_ms: int = REPLY_TIMEOUT_MS) -> object:
    assert socket.poll(timeout_ms), "no reply: the worker hangs"
    return decode(socket.recv())  # whatever a worker sends is a valid message


def assert_serves(worker: LiveWorker) -> None:
    """The worker is alive and answers a valid request after a reset (Hello frees every slot)."""
    assert worker.process.poll() is None, "the worker died"
    worker.socket.send(encode(Hello(0)))
    assert isinstance(reply(worker.socket), Ready)
    if worker.role == "draft":
        worker.socket.send(encode(DraftRequest(1, 0, 0, [1, 2, 3], 2)))
        result = reply(worker.socket)
        assert isinstance(result, DraftResult) and len(result.tokens) == 2, result
    else:
        worker.socket.send(encode(VerifyRequest(1, 0, 0, [1, 2, 3], 0)))
        result = reply(worker.socket)
        assert isinstance(result, VerifyResult) and result.cached == 3, result


@pytest.mark.slow
def test_mutated_messages_at_a_live_worker(worker):
    # every message type, mutated; tensors of every shape no sender makes, wherever a message carries one
    window = 64  # in flight at once: keeps the socket busy without round-trip waits
    errors = sent = 0
    batch = []
    for payload in payloads(MUTATED, seed=1):
        batch.append(payload)
        if len(batch) == window:
            for item in batch:
                worker.socket.send(item)
            for _ in batch:
                errors += isinstance(reply(worker.socket), ErrorReply)
            sent += len(batch)
            batch = []
    assert sent >= 10_000 and errors > 0.9 * sent
    assert_serves(worker)
    assert worker.logged().count("dropped a bad message") >= 0.8 * sent


@pytest.mark.slow
@settings(max_examples=STRUCTURED, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=structured())
def test_structured_messages_at_a_live_worker(worker, payload):
    if is_shutdown(payload):
        return
    worker.socket.send(payload)
    reply(worker.socket)
    assert worker.process.poll() is None


@pytest.mark.slow
@pytest.mark.parametrize("tensor", ODD_TENSORS, ids=lambda t: str(t["shape"]))
def test_a_tensor_no_message_could_fill_is_refused_and_the_worker_goes_on(worker, tensor):
    # [0, 2**64 - 1] with no bytes passed the size check, and torch.zeros raised out of the worker's loop
    seed = msgpack.unpackb(encode(VerifyRequest(7, 0, 0, [1, 2], 1, torch.full((1, 8), 0.125), SamplingParams(0.8))))
    seed["body"]["probs"] = tensor
    worker.socket.send(msgpack.packb(seed, use_bin_type=True))
    answer = reply(worker.socket)
    assert isinstance(answer, ErrorReply) and "probs" in answer.message
    assert_serves(worker)


@pytest.mark.slow
def test_a_peer_that_does_not_own_the_worker_is_refused_every_request(worker):
    with peer(worker.address) as stranger:
        for example in EXAMPLES:
            if isinstance(example, Hello):
                continue  # a Hello is how a coordinator takes a worker (test_second_coordinator)
            stranger.send(encode(example))
            answer = reply(stranger)
            assert isinstance(answer, ErrorReply) and not answer.fatal, (example, answer)
            assert "serves another coordinator" in answer.message
        assert "refused a TraceCollect from a peer that does not own this worker" in worker.logged()
    assert_serves(worker)


@pytest.mark.slow
def test_oversized_and_multipart_messages_are_dropped(worker):
    with peer(worker.address) as client:
        client.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))  # libzmq closes the connection; the client reconnects
        client.send_multipart([encode(Ping(1)), b"second frame"])  # not one frame: ignored
        time.sleep(0.5)
        client.send(encode(Ping(2)))
        answer = reply(client)  # answered (a refusal: this client does not own the worker)
        assert isinstance(answer, ErrorReply) and "serves another coordinator" in answer.message
    assert_serves(worker)
    assert "sent a message over the size limit" in worker.logged()


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


@settings(max_examples=1000, deadline=1000)
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
