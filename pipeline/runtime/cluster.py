"""Starting, watching and stopping the worker processes of one pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import zmq

from pipeline.algorithm.generation import ModelLimits
from pipeline.config import ModelsConfig, RemoteConfig, WorkersConfig, worker_roles
from pipeline.errors import WorkerFailed
from pipeline.runtime.liveness import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    Heartbeats,
    exit_description,
    process_sentinel,
)
from pipeline.runtime.preflight import Vocabulary, check_shared_vocabulary
from pipeline.runtime.remote_workers import ADDRESS_OPTIONS, client_keys
from pipeline.runtime.transport import ZmqTransport
from pipeline.runtime.worker_process import OutputTail, worker_command
from workers.backends.torch_device import pin_threads, restore_threads
from workers.protocol.messages import Hello, Ready, Shutdown
from workers.worker_settings import WorkerSettings


def log(text: str) -> None:
    print(f"[coord] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LivenessConfig:
    """How long the workers may take to load, and how their liveness is watched."""

    ready_timeout_s: float = 120.0
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S

    @property
    def heartbeats(self) -> Heartbeats:
        return Heartbeats(self.heartbeat_interval_s, self.heartbeat_timeout_s)


@dataclass(frozen=True)
class ClusterConfig:
    target: WorkerSettings
    draft: WorkerSettings | None  # None: target-only, no draft process
    liveness: LivenessConfig = LivenessConfig()
    remote: RemoteConfig = RemoteConfig()  # workers that run already: used instead of spawning them
    protect_target_core: bool = True  # see LocalCluster._start
    target_spin_ms: float = 50.0
    # added niceness of a draft on the coordinator's core: none unless asked (--draft-nice). At 19, any
    # normal-priority neighbour (a compile, a test run) took nearly all of its core: speculation ran at
    # 0.05x target-only beside two nice-5 busy loops (docs/notes.md).
    draft_nice: int = WorkersConfig.draft_nice


def default_cores(threads: list[int]) -> list[tuple[int, ...]]:
    """One disjoint block of cores per worker, as many as its threads, when the machine has enough; else no
    pinning."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < sum(threads):
        return [()] * len(threads)
    starts = [sum(threads[:i]) for i in range(len(threads))]
    return [tuple(available[start : start + count]) for start, count in zip(starts, threads)]


def cluster_config(models: ModelsConfig, workers: WorkersConfig, mode: str, slots: int = 1,
                   liveness: LivenessConfig = LivenessConfig(), remote: RemoteConfig = RemoteConfig()) -> ClusterConfig:
    """The workers a pipeline in `mode` runs (no draft in target-only), each holding `slots` KV slots (one per
    sequence decoded at once: DecodeConfig.slots) and, on a CPU, pinned to a block of cores of its own when
    the machine has enough (default_cores). `--dtype auto` travels as it is: each worker resolves it for its device."""
    roles = worker_roles(mode)
    on_cpu = {role: workers.device(role) == "cpu" for role in roles}
    threads = [workers.threads_of(role) for role in roles]
    blocks = default_cores(threads) if any(on_cpu.values()) else [()] * len(roles)
    specs = {role: WorkerSettings(role, str(models.directory(role)), bind="", backend=workers.backend,
                              device=workers.device(role), dtype=workers.dtype, threads=workers.threads_of(role),
                              cores=cores if on_cpu[role] else (), slots=max(slots, 1),
                              max_seq_len=workers.max_model_len)
             for role, cores in zip(roles, blocks)}
    return ClusterConfig(target=specs["target"], draft=specs.get("draft"), liveness=liveness, remote=remote,
                         draft_nice=workers.draft_nice)


def ipc_address(directory: str, role: str) -> str:
    return f"ipc://{directory}/{role}.sock"


class LocalCluster:
    """Spawns the workers as child processes on this host, talks to them over ipc:// sockets.

    Use as a context manager: every exit path stops the workers.
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.socket_dir = tempfile.mkdtemp(prefix="specpipe-")
        self.processes: dict[str, subprocess.Popen] = {}
        self.output: dict[str, OutputTail] = {}  # role -> what its process wrote, copied to our stderr
        self.sentinels: dict[str, int] = {}  # role -> pidfd of its process
        self.transport: ZmqTransport | None = None
        self.ready: dict[str, Ready] = {}
        self._saved_affinity: set[int] | None = None  # the coordinator's, before it pinned itself
        self._saved_thread_affinity: dict[int, set[int]] = {}
        self.coordinator_spin_s = 0.0
        self.remote = config.remote.addresses  # role -> address of a worker that runs already: not ours to stop
        self.coordinator_shares_core_with: frozenset[str] = frozenset()

    def __enter__(self) -> "LocalCluster":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start(self) -> None:
        specs = {"target": self.config.target}
        if self.config.draft is not None:
            specs["draft"] = self.config.draft
        if self.config.draft is None and self.config.remote.draft_addr:
            raise ValueError("--draft-addr is unused with --mode target-only; drop it or pick another --mode")
        keys = client_keys(self.remote, self.config.remote.curve_secret_key, self.config.remote.server_keys)
        specs = {role: replace(spec, bind=self.remote[role], cores=()) if role in self.remote
                 else replace(spec, bind=ipc_address(self.socket_dir, role)) for role, spec in specs.items()}
        # The target is the bottleneck. When it is pinned, it keeps its cores to itself and busy-polls
        # for its next request; the coordinator runs elsewhere (on the draft's cores, the draft at
        # lower priority so that the coordinator's wake-ups preempt it at once).
        target_cores = set(specs["target"].cores)
        coordinator_cores: set[int] = set()
        if target_cores and self.config.protect_target_core:
            coordinator_cores = set(os.sched_getaffinity(0)) - target_cores
            if coordinator_cores:
                # its ZeroMQ threads on the coordinator's cores: each reply they carry would preempt it
                specs["target"] = replace(specs["target"], spin_ms=self.config.target_spin_ms,
                                          io_cores=tuple(sorted(coordinator_cores)))
                # Someone must keep the coordinator's core awake (a halted vCPU wakes in hundreds of
                # microseconds). A draft sharing the core busy-polls between its requests, yielding the
                # core at every turn (the coordinator, woken by a reply, runs at once) and sleeping
                # instead once another task wants it (workers.spin); the coordinator itself busy-polls
                # only while that draft is out of use (target-only), since two spinners on one core take
                # turns in slices of milliseconds.
                self.coordinator_spin_s = self.config.target_spin_ms / 1000
                if "draft" in specs and set(specs["draft"].cores) & coordinator_cores:
                    specs["draft"] = replace(specs["draft"], nice=self.config.draft_nice,
                                             spin_ms=self.config.target_spin_ms)
                    self.coordinator_shares_core_with = frozenset({"draft"})
        self.config.liveness.heartbeats.validate()
        for role, spec in specs.items():
            if role in self.remote:
                continue  # running already: nothing to spawn, no process to watch (heartbeats only)
            env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads))
            command = worker_command(replace(spec, parent_pid=os.getpid()).argv())
            # A session of its own: a Ctrl-C at the terminal reaches the coordinator alone, which then
            # winds the workers down in order (and the worker exits by itself if we die: --parent-pid).
            # A worker's output goes to our stderr: its results travel over ZeroMQ, and what a library writes
            # to stdout (tt-metal logs there) must not land among the text or the --json records.
            self.processes[role] = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.output[role] = OutputTail(self.processes[role])
            sentinel = process_sentinel(self.processes[role].pid)
            if sentinel is not None:
                self.sentinels[role] = sentinel
        if coordinator_cores:  # after spawning: children inherit affinity
            self._saved_affinity = os.sched_getaffinity(0)
            self._saved_thread_affinity = pin_threads(coordinator_cores)  # the tokenizer's and heartbeat threads too
        self.transport = ZmqTransport({role: spec.bind for role, spec in specs.items()}, self.check_alive,
                                      spin_s=self.coordinator_spin_s, heartbeats=self.config.liveness.heartbeats,
                                      shares_core_with=self.coordinator_shares_core_with,
                                      sentinels=self.sentinels, curve=keys)
        began = time.perf_counter()
        try:
            self.ready = self.transport.handshake(self.config.liveness.ready_timeout_s)
        except TimeoutError as error:
            if not self.remote:
                raise
            raise TimeoutError(f"{error}; is `specpipe worker` listening at "
                               + " and ".join(f"{ADDRESS_OPTIONS[r]} {a}" for r, a in self.remote.items())
                               + " (and does it list this coordinator's key in --curve-clients)?") from None
        if "draft" in self.ready:
            draft, target = (Vocabulary.of_worker(self.ready[role]) for role in ("draft", "target"))
            check_shared_vocabulary(draft, target)
        log(f"workers ready in {time.perf_counter() - began:.1f} s: "
            + ", ".join(f"{role} pid {r.pid} ({r.model}, {r.device})" for role, r in self.ready.items()))

    def limits(self) -> ModelLimits:
        target = self.ready["target"]
        max_context = min(r.max_context for r in self.ready.values())
        return ModelLimits(target.vocab_size, frozenset(target.eos_ids), max_context)

    def check_alive(self) -> None:
        for role, process in self.processes.items():
            code = process.poll()
            if code is not None:
                doing = self.transport.activity(role) if self.transport is not None else ""
                # a worker that exits with an error code said why last (a traceback ends with the exception)
                last_words = self.output[role].last_line() if code > 0 else ""
                raise WorkerFailed(f"[{role}] the {role} worker (pid {process.pid}, {self.config_of(role).checkpoint}) "
                                   f"{exit_description(code)} {doing}".rstrip()
                                   + (f"; its last line: {last_words}" if last_words else ""))

    def _leave_remote_workers(self, timeout_s: float = 1.0) -> None:
        """Remote workers keep running for the next launch; a Hello makes each free every KV slot
        (whatever this launch left behind) and its Ready confirms it before the socket closes."""
        if self.transport is None:
            return
        roles = set()
        for role in self.remote:
            try:
                if role not in self.transport.lost:
                    self.transport.submit(role, Hello(os.getpid()), block=False)
                    roles.add(role)
            except zmq.Again:  # not connected (refused, or gone): nothing of ours is held there
                pass
        unconfirmed = set(roles)
        deadline = time.monotonic() + timeout_s
        try:
            while unconfirmed and time.monotonic() < deadline:
                for role, reply in self.transport.wait(0.05):
                    if isinstance(reply, Ready):
                        unconfirmed.discard(role)
        except (WorkerFailed, ValueError):
            pass
        for role in roles:
            state = "it did not confirm freeing its KV slots" if role in unconfirmed else "its KV slots freed"
            log(f"left the {role} worker at {self.remote[role]} running ({state})")

    def config_of(self, role: str) -> WorkerSettings:
        return self.config.target if role == "target" else self.config.draft

    def close(self) -> None:
        self._leave_remote_workers()
        lost = self.transport.lost if self.transport is not None else set()
        for role, process in self.processes.items():
            if process.poll() is not None:
                continue
            if role in lost:
                process.kill()  # hung (or stopped): it would not read a Shutdown
            elif self.transport is not None:
                self.transport.submit(role, Shutdown("coordinator exiting"))
            else:
                process.terminate()
        deadline = time.monotonic() + 2.0
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        for sentinel in self.sentinels.values():
            os.close(sentinel)
        self.sentinels.clear()
        if self._saved_affinity is not None:
            restore_threads(self._saved_thread_affinity, self._saved_affinity)
            self._saved_affinity = None
        shutil.rmtree(self.socket_dir, ignore_errors=True)
