"""The worker process: load a model, bind a ZeroMQ socket, answer requests until told to stop."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import zmq

from workers.auth import secure
from workers.backends import cpu_native
from workers.backends.torch_device import lower_priority, pin_thread_ids, running_threads, set_cpu_threads
from workers.connection_log import log_connection_events
from workers.errors import SpecpipeError
from workers.model.checkpoint import read_config, tokenizer_fingerprint
from workers.model.torch_runner import ModelRunner
from workers.owner import Owner
from workers.parent import exit_with_parent
from workers.protocol.codec import ProtocolError, decode, encode
from workers.protocol.limits import MAX_MESSAGE_BYTES, MAX_QUEUED_REPLIES, MAX_QUEUED_REQUESTS
from workers.protocol.messages import (
    ClockProbe,
    ClockReading,
    ErrorReply,
    Hello,
    Ready,
    Shutdown,
    TraceCollect,
    TraceSpans,
    TraceStart,
    TraceStarted,
    request_kind,
    request_sequence,
)
from workers.service import WorkerService
from workers.spans import SpanRecorder
from workers.spin import Spinner
from workers.worker_settings import WorkerSettings, resolved_dtype


def log(role: str, text: str) -> None:
    print(f"[{role}] {text}", file=sys.stderr, flush=True)


def load(spec: WorkerSettings, zmq_threads: set[int] = frozenset()) -> tuple[WorkerService, Ready]:
    """The model and its Ready; `zmq_threads` (ZeroMQ's own) go to spec.io_cores when it names any."""
    if spec.backend not in ("torch", "ttnn"):
        raise SpecpipeError(f"backend {spec.backend!r} is not available in this build; use --backend torch")
    set_cpu_threads(spec.threads, list(spec.cores) or None)
    cpu_native.set_threads(spec.threads)
    if spec.io_cores:
        pin_thread_ids(zmq_threads, spec.io_cores)
    if spec.nice:
        lower_priority(spec.nice)
    spec = replace(spec, max_seq_len=kv_positions(spec))
    runner = None
    if spec.backend == "ttnn":  # None: this worker stays on torch (a draft left on the CPU)
        from workers.model.ttnn_runner import open_runner

        runner = open_runner(spec, lambda text: log(spec.role, text))
    if runner is None:
        runner = ModelRunner.from_checkpoint(
            spec.checkpoint, device=spec.device, dtype=resolved_dtype(spec.dtype, spec.device), n_slots=spec.slots,
            max_seq_len=spec.max_seq_len or None,
        )
    ready = Ready(
        role=spec.role, pid=os.getpid(), model=Path(spec.checkpoint).name, vocab_size=runner.config.vocab_size,
        tokenizer_hash=tokenizer_fingerprint(spec.checkpoint), max_context=runner.max_seq_len,
        eos_ids=list(runner.config.eos_token_ids), backend=spec.backend, device=str(runner.device), slots=spec.slots,
    )
    return WorkerService(spec.role, runner), ready


def kv_positions(spec: WorkerSettings) -> int:
    """Positions per KV slot: --max-seq-len, cut to the model's context (a coordinator asks for its
    --max-model-len whatever the model), or the model's context for 0."""
    context = read_config(spec.checkpoint).max_position_embeddings
    return min(spec.max_seq_len, context) if spec.max_seq_len else context


def serve(spec: WorkerSettings) -> int:
    """Runs the worker until Shutdown; returns the process exit code."""
    context = zmq.Context()
    before = running_threads()
    socket = context.socket(zmq.ROUTER)
    zmq_threads = running_threads() - before  # its first socket starts the context's I/O and reaper threads
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    socket.setsockopt(zmq.RCVHWM, MAX_QUEUED_REQUESTS)
    socket.setsockopt(zmq.SNDHWM, MAX_QUEUED_REPLIES)
    try:
        authenticator = secure(context, socket, spec)  # CURVE, or loopback only
    except SpecpipeError as error:
        log(spec.role, f"error: {error}")
        return _close(context, socket, None, 2)
    try:
        socket.bind(spec.bind)
    except zmq.ZMQError as error:
        log(spec.role, f"cannot listen on {spec.bind}: {error}")
        return _close(context, socket, authenticator, 2)
    signal.signal(signal.SIGTERM, _stop)
    poller = _poller_woken_by_signals(socket)
    log_connection_events(socket, lambda text: log(spec.role, text))
    try:
        if spec.parent_pid:
            exit_with_parent(spec.parent_pid)
        service, ready = load(spec, zmq_threads)
    except SpecpipeError as error:
        log(spec.role, f"error: {error}")
        return _fail_hello(socket, spec.role, str(error))
    except KeyboardInterrupt:  # SIGTERM while loading
        return 0
    numerics = f", {service.runner.numerics}" if service.runner.numerics else ""
    log(spec.role, f"{ready.model} on {ready.device}{numerics}, {spec.threads} thread(s)"
                   f"{', cores ' + ','.join(map(str, spec.cores)) if spec.cores else ''}, listening on {spec.bind}"
                   f"{' (CURVE)' if authenticator else ''}")
    spans = SpanRecorder()  # started and collected by `specpipe profile`
    spinner = Spinner(spec.spin_ms / 1000)
    owner = Owner()
    try:
        while True:
            idle_from = time.perf_counter()
            _await_message(socket, poller, spinner)
            arrived = time.perf_counter()
            identity, payload = _receive(socket)
            if payload is None:
                continue
            received = time.perf_counter()
            try:
                message = decode(payload)
            except ProtocolError as error:
                log(spec.role, f"dropped a bad message: {error}")
                socket.send_multipart([identity, encode(ErrorReply(-1, f"bad message: {error}", fatal=False))])
                continue
            decoded = time.perf_counter()
            owner.saw(identity, decoded)
            kind = type(message).__name__
            if isinstance(message, (Hello, Shutdown)):
                refusal = owner.refusal(identity, service.core.slots.active, decoded)
                if refusal is not None:
                    log(spec.role, f"refused a {kind} from a second coordinator: {refusal}")
            else:
                refusal = owner.stranger(identity, kind)
                if refusal is not None:
                    log(spec.role, f"refused a {kind} from a peer that does not own this worker")
            if refusal is not None:
                socket.send_multipart([identity, encode(ErrorReply(getattr(message, "request_id", -1), refusal,
                                                                   fatal=False))])
                continue
            if isinstance(message, Shutdown):
                return 0
            if isinstance(message, (ClockProbe, TraceStart, TraceCollect)):
                socket.send_multipart([identity, encode(_trace_control(message, spans))])
                continue
            if isinstance(message, Hello):
                owner.take(identity, message.coordinator_pid, decoded)
                service.reset()  # a new coordinator: nothing of the previous one's sequences is wanted
            try:
                reply = ready if isinstance(message, Hello) else service.handle(message)
            except Exception as error:  # the model itself failed: tell the coordinator, then exit
                text = f"{type(error).__name__}: {error}"
                log(spec.role, f"fatal: {text}")
                request_id = getattr(message, "request_id", -1)
                socket.send_multipart([identity, encode(ErrorReply(request_id, text, fatal=True))])
                return 1
            computed = time.perf_counter()
            data = encode(reply)
            encoded = time.perf_counter()
            socket.send_multipart([identity, data])
            if spans.active:
                sent = time.perf_counter()
                seq_id = request_sequence(message)
                kind, size = request_kind(message)
                spans.add("idle", idle_from, arrived)
                spans.add("recv", arrived, received, seq_id)
                spans.add("unpack", received, decoded, seq_id)
                spans.add(kind, decoded, computed, seq_id, size)
                spans.add("pack", computed, encoded, seq_id)
                spans.add("send", encoded, sent, seq_id)
    except KeyboardInterrupt:
        return 0
    finally:
        socket.disable_monitor()
        _close(context, socket, authenticator, 0)


def _close(context: zmq.Context, socket: zmq.Socket, authenticator, code: int) -> int:
    if authenticator is not None:
        authenticator.stop()
    socket.close(0)
    context.term()
    return code


def _poller_woken_by_signals(socket: zmq.Socket) -> zmq.Poller:
    """A poller on `socket` and on a pipe that Python's C-level signal handler writes to.

    The kernel hands a process-directed SIGTERM to any thread that does not block it: the connection
    log's, the authenticator's, an OpenMP worker's. Python then runs the handler in the main thread only
    when that thread next executes bytecode, which a blocking zmq_poll in the main thread never does.
    With the wakeup pipe in the poll set, whichever thread took the signal wakes the main one."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    poller.register(read_end, zmq.POLLIN)
    return poller


def _await_message(socket: zmq.Socket, poller: zmq.Poller, spinner: Spinner) -> None:
    """Polls without sleeping while `spinner` lets it (the next request usually follows within milliseconds,
    and waking a sleeping process costs hundreds of microseconds on a VM; but not on a core another task
    wants: workers.spin), then blocks. A signal ends the wait by running its handler (SIGTERM raises
    KeyboardInterrupt) on the way out."""
    if spinner.spin(lambda: bool(socket.poll(0))):
        return
    while not socket.poll(0):
        for fd, _ in poller.poll():
            if isinstance(fd, int):
                os.read(fd, 512)  # drain the signal bytes; the handler runs when poll returns


def _trace_control(message: ClockProbe | TraceStart | TraceCollect, spans: SpanRecorder) -> object:
    """The worker's side of `specpipe profile`: its clock, and the spans it recorded."""
    if isinstance(message, ClockProbe):
        return ClockReading(message.nonce, time.perf_counter())
    if isinstance(message, TraceStart):
        try:
            spans.start(message.capacity)
        except ValueError as error:
            return ErrorReply(-1, str(error), fatal=False)
        return TraceStarted(message.capacity)
    recorded, dropped = spans.collect()
    return TraceSpans(recorded, dropped)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _receive(socket: zmq.Socket) -> tuple[bytes, bytes | None]:
    frames = socket.recv_multipart()
    if len(frames) != 2:
        return frames[0], None  # a ROUTER always prefixes the sender; anything else is noise
    return frames[0], frames[1]


def _fail_hello(socket: zmq.Socket, role: str, message: str) -> int:
    """Answers the coordinator's Hello with the load error, so the user sees it rather than a timeout."""
    if socket.poll(10_000):
        identity, _ = _receive(socket)
        socket.send_multipart([identity, encode(ErrorReply(-1, message, fatal=True))])
    return 1
