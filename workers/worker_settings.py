"""What a worker process is asked to be: one frozen dataclass, one field per `specpipe worker` option
(and what its `--dtype auto` stands for)."""

from __future__ import annotations

from dataclasses import dataclass

AUTO_DTYPE = "auto"
# What --dtype takes: auto, the torch dtypes (workers.backends.torch_device.DTYPES) and fp16 weights on a CPU
# (workers.backends.cpu_fp16.FP16_WEIGHTS); spelled here so the command line needs no torch to list them.
DTYPE_CHOICES = (AUTO_DTYPE, "float32", "bfloat16", "float16", "fp16-weights")


def resolved_dtype(dtype: str, device: str) -> str:
    """`--dtype auto` for a torch worker on `device`: fp16-weights on a CPU where it runs (else float32),
    bfloat16 elsewhere (CUDA); any other dtype is itself. Each worker resolves it, one started by hand too."""
    if dtype != AUTO_DTYPE:
        return dtype
    if device != "cpu":
        return "bfloat16"
    from workers.backends.cpu_fp16 import FP16_WEIGHTS, fp16_weights_available  # imports torch

    return FP16_WEIGHTS if fp16_weights_available() else "float32"


@dataclass(frozen=True)
class WorkerSettings:
    role: str  # "draft" | "target"
    checkpoint: str
    bind: str  # ZeroMQ address the worker listens on
    backend: str = "torch"
    device: str = "cpu"
    dtype: str = AUTO_DTYPE  # see resolved_dtype
    threads: int = 1
    cores: tuple[int, ...] = ()  # CPU cores to pin to; () = leave affinity alone
    io_cores: tuple[int, ...] = ()  # cores for ZeroMQ's I/O threads; () = wherever the rest are
    slots: int = 8  # sequences it can hold at once (KV slots)
    max_seq_len: int = 0  # positions per KV slot, at most the model's context; 0 = the model's context
    spin_ms: float = 0.0  # busy-poll this long for the next request before sleeping (for a worker that owns its core)
    nice: int = 0  # added niceness: a worker that shares its core with the coordinator yields to it
    parent_pid: int = 0  # exit when this process (the coordinator that spawned us) is gone; 0 = never
    curve_secret_key: str = ""  # this worker's CURVE key pair (NAME.key_secret); "" = loopback only
    curve_clients: tuple[str, ...] = ()  # public key files or directories of them: the clients let in

    def argv(self) -> list[str]:
        """The `specpipe worker` arguments that rebuild this spec."""
        args = ["--role", self.role, "--checkpoint", self.checkpoint, "--bind", self.bind, "--backend", self.backend,
                "--device", self.device, "--dtype", self.dtype, "--threads", str(self.threads),
                "--slots", str(self.slots), "--max-seq-len", str(self.max_seq_len), "--spin-ms", str(self.spin_ms),
                "--nice", str(self.nice)]
        if self.cores:
            args += ["--cores", ",".join(map(str, self.cores))]
        if self.io_cores:
            args += ["--io-cores", ",".join(map(str, self.io_cores))]
        if self.parent_pid:
            args += ["--parent-pid", str(self.parent_pid)]
        if self.curve_secret_key:
            args += ["--curve-secret-key", self.curve_secret_key]
        for clients in self.curve_clients:
            args += ["--curve-clients", clients]
        return args
