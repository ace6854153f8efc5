"""The engine behind the HTTP server: one thread owns the Engine and its transport, requests come and go.

The HTTP side (an asyncio event loop) never touches the scheduler: it queues commands (add a sequence,
cancel one) that this thread takes between engine steps, and reads each request's tokens from a
RequestStream that this thread fills. Every sequence the workers decode at once, from whichever
requests, goes through the scheduler's batches, so concurrent clients share the workers' steps.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.algorithm.engine import Engine, Transport
from pipeline.algorithm.generation import ModelLimits
from pipeline.algorithm.scheduler import Scheduler
from pipeline.algorithm.sequence import Phase, Sequence
from pipeline.config import DecodeConfig
from pipeline.errors import WorkerFailed
from pipeline.serving.metrics import ServingMetrics, SpecCounts
from workers.sampling import SamplingParams

IDLE_WAIT_S = 0.1  # with nothing to decode: how often the workers' health is checked
STEP_WAIT_S = 0.05  # an engine step waits this long for a reply before taking new commands
TRIPS_KEPT = 256  # per-batch records the engine keeps (a server runs for days)
STOP_TIMEOUT_S = 2.0  # waiting for the workers to confirm freeing every slot on the way out


@dataclass(frozen=True)
class Finished:
    """The last thing a request's stream carries."""

    reason: str  # "eos", "length", "cancelled" or "error"
    error: str | None
    prompt_tokens: int
    completion_tokens: int


class EngineUnavailable(RuntimeError):
    """The engine failed (a worker died) or is shutting down: no request can be served."""


class RequestStream:
    """One request's output: lists of new token ids, then one Finished. Filled from the engine thread,
    read on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[list[int] | Finished] = asyncio.Queue()

    def put(self, item: list[int] | Finished) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def get(self) -> list[int] | Finished:
        return await self._queue.get()


@dataclass(frozen=True)
class Add:
    seq_id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stream: RequestStream
    arrived: float  # time.perf_counter() when the request came in


@dataclass(frozen=True)
class Cancel:
    seq_id: int


@dataclass(frozen=True)
class Stop:
    pass


@dataclass
class Tracked:
    """A request's sequence, as the engine thread follows it."""

    add: Add
    sequence: Sequence
    last_token_at: float | None = None
    reported: SpecCounts = field(default_factory=SpecCounts)


class EngineLoop:
    """Runs the engine on a thread of its own; submit and cancel are safe from any thread."""

    def __init__(self, transport: Transport, limits: ModelLimits, decode: DecodeConfig, metrics: ServingMetrics,
                 log: Callable[[str], None], on_failure: Callable[[str], None] | None = None) -> None:
        decode.validate(limits.max_context)
        self.limits = limits
        self.metrics = metrics
        self.transport = transport
        self.log = log
        self.on_failure = on_failure  # called once, from the engine thread, when the engine cannot go on
        self.scheduler = Scheduler(decode, limits.vocab_size, set(limits.eos_ids), limits.max_context,
                                   decode.max_seqs, self._on_tokens, on_event=log)
        # a stall fails the stalled requests alone (each stream gets a line, the log the report); the rest go on
        self.engine = Engine(self.scheduler, transport, poll_s=STEP_WAIT_S, trips_kept=TRIPS_KEPT, on_stall=log)
        self.failure: str | None = None  # why the engine stopped, once it has
        self._inbox: queue.SimpleQueue[Add | Cancel | Stop] = queue.SimpleQueue()
        self._tracked: dict[int, Tracked] = {}
        self._seq_ids = itertools.count()
        self._lock = threading.Lock()  # orders submit against _fail and stop
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="specpipe-engine", daemon=True)

    # --- any thread -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt: list[int], max_new_tokens: int, sampling: SamplingParams, stream: RequestStream) -> int:
        """Queues a sequence; returns its id (for cancel). Raises EngineUnavailable once the engine has stopped."""
        with self._lock:
            if self.failure is not None:
                raise EngineUnavailable(self.failure)
            if self._stopping:
                raise EngineUnavailable("the server is shutting down")
            seq_id = next(self._seq_ids)
            self._inbox.put(Add(seq_id, list(prompt), max_new_tokens, sampling, stream, time.perf_counter()))
        return seq_id

    def cancel(self, seq_id: int) -> None:
        """Ends the sequence (its client went away, or a stop string came): both workers free its KV slots."""
        self._inbox.put(Cancel(seq_id))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancels whatever still runs, frees every slot in the workers and ends the thread."""
        with self._lock:
            self._stopping = True
        self._inbox.put(Stop())
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._take_commands(IDLE_WAIT_S if self.engine.idle else 0.0):
                if self.engine.idle:
                    for role, reply in self.transport.wait(0):  # raises WorkerFailed for a dead or silent worker
                        self.log(f"dropped an unexpected {type(reply).__name__} from the {role} worker")
                else:
                    self.engine.step()
                self._sweep()
            self.engine.cancel(STOP_TIMEOUT_S)
            self._sweep()
        except Exception as error:  # noqa: BLE001 - the server must hear of anything that stops the engine
            if not isinstance(error, WorkerFailed):
                traceback.print_exc(file=sys.stderr)
            self._fail(str(error) if isinstance(error, WorkerFailed) else f"{type(error).__name__}: {error}")

    def _take_commands(self, wait_s: float) -> bool:
        """Takes every queued command (waiting up to wait_s for the first); False once told to stop."""
        try:
            command = self._inbox.get(timeout=wait_s) if wait_s else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(command, Stop):
                return False
            if isinstance(command, Add):
                self._add(command)
            else:
                self.scheduler.cancel_sequence(command.seq_id)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, add: Add) -> None:
        try:
            sequence = self.scheduler.add(add.seq_id, add.prompt, add.max_new_tokens, add.sampling)
        except ValueError as error:  # the HTTP side checked the request; this is a last guard
            add.stream.put(Finished("error", str(error), len(add.prompt), 0))
            return
        self._tracked[add.seq_id] = Tracked(add, sequence)
        self.metrics.prompt_tokens.inc(len(add.prompt))

    def _on_tokens(self, sequence: Sequence, new_tokens: list[int]) -> None:
        tracked = self._tracked.get(sequence.seq_id)
        if tracked is None or not new_tokens:
            return
        now = time.perf_counter()
        if tracked.last_token_at is None:
            self.metrics.ttft.observe(now - tracked.add.arrived)
        else:
            gap = (now - tracked.last_token_at) / len(new_tokens)  # tokens committed together share the gap
            for _ in new_tokens:
                self.metrics.inter_token.observe(gap)
        tracked.last_token_at = now
        self.metrics.generation_tokens.inc(len(new_tokens))
        tracked.add.stream.put(list(new_tokens))

    def _sweep(self) -> None:
        """After a step: speculation counters, each finished request's Finished, the gauges."""
        for seq_id, tracked in list(self._tracked.items()):
            sequence = tracked.sequence
            self.metrics.speculation(sequence.stats, tracked.reported)
            if sequence.phase is Phase.FINISHED:
                del self._tracked[seq_id]
                tracked.add.stream.put(Finished(sequence.finish_reason or "error", sequence.error,
                                                len(sequence.prompt), len(sequence.generated)))
        self.scheduler.prune()
        self.metrics.running.set(len(self.scheduler.active))
        self.metrics.waiting.set(len(self.scheduler.waiting))
        controller = self.scheduler.controller
        if controller is not None:
            self.metrics.draft_state(controller.drafting_off, controller.off_events)

    def _fail(self, message: str) -> None:
        with self._lock:
            self.failure = message
        self.log(f"the engine stopped: {message}")
        for tracked in self._tracked.values():
            tracked.add.stream.put(Finished("error", message, len(tracked.add.prompt),
                                            len(tracked.sequence.generated)))
        self._tracked.clear()
        while True:  # requests queued before the failure was known
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, Add):
                command.stream.put(Finished("error", message, len(command.prompt), 0))
        self.metrics.running.set(0)
        self.metrics.waiting.set(0)
        if self.on_failure is not None:
            self.on_failure(message)
