"""TtnnRunner: a model on a Tenstorrent device over its KV slots, decode replayed from a trace.

Slots, lengths, rollback and the argument checks are RunnerBase's: `truncate` only moves a length. Each
slot also keeps its token ids on the host, because a forward re-feeds the start of its 32-position
window (see ttnn_llama). Every forward that fits one window of 32 positions -- a one-token decode or
a short verification -- is replayed from a trace captured for that slot and window: the first such
forward runs eagerly (warm-up: tt-metal compiles its kernels), the next one captures the trace, and
later ones only copy the new inputs in and replay. Crossing into the next window recaptures (one
capture per 32 positions per slot). Longer windows (prefill) run eagerly.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from workers.backends.ttnn_device import (
    OpenDevice,
    check_chips_present,
    device_kind,
    import_ttnn,
    isolate_process,
    open_device,
    parse_device,
    simulator_library,
)
from workers.errors import DeviceError
from workers.model.checkpoint import check_weight_names, read_config, read_hf_weights
from workers.model.config import ModelConfig
from workers.model.runner_base import RunnerBase
from workers.model.ttnn_llama import TILE, TtModel, round_up
from workers.worker_settings import WorkerSettings

TRACE_REGION_BYTES = 64 << 20  # device DRAM kept for captured traces (one live trace per slot)
WEIGHT_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "bfloat8_b": "bfloat8_b", "bfp8": "bfloat8_b",
                 # what `specpipe launch --dtype auto` resolves to for a device it takes for a CPU
                 "fp16-weights": "bfloat16", "auto": "bfloat16"}


def weight_dtype(name: str) -> str:
    try:
        return WEIGHT_DTYPES[name]
    except KeyError:
        raise DeviceError(f"dtype {name!r} is not supported by the ttnn backend; use --dtype bfloat16 or bfloat8_b") from None


@dataclass
class Timings:
    """Wall-clock seconds, kept apart: one-off costs versus the steady state."""

    open_s: float = 0.0
    load_s: float = 0.0  # weights converted, tiled and uploaded; KV cache allocated
    warmup_s: float = 0.0  # the first 32-position window, run eagerly (kernel compilation)
    captures: list[float] = field(default_factory=list)
    replays: list[float] = field(default_factory=list)  # steady state: inputs copied in, trace replayed, logits read
    eager: list[float] = field(default_factory=list)  # prefill and long windows

    def summary(self) -> str:
        def mean_ms(values: list[float]) -> str:
            return f"{1000 * sum(values) / len(values):.2f} ms" if values else "-"

        return (f"device open {self.open_s:.2f} s, weights {self.load_s:.2f} s, warm-up {self.warmup_s:.2f} s; "
                f"{len(self.captures)} trace capture(s), mean {mean_ms(self.captures)}; "
                f"steady state: {len(self.replays)} replayed window(s), mean {mean_ms(self.replays)}; "
                f"{len(self.eager)} eager window(s), mean {mean_ms(self.eager)}")


@dataclass
class _Trace:
    base: int  # first position of the window it was captured for
    trace_id: Any
    logits: Any  # its output tensor, rewritten by every replay


class TtnnRunner(RunnerBase):
    """The ttnn TtModel (ttnn_llama.py) over `n_slots` KV slots. No scratch rows (`scratch_rows` False):
    a draft on the device drafts overlap's branches one by one."""

    def __init__(self, ttnn: Any, model: TtModel, n_slots: int, max_seq_len: int, *, device_name: str,
                 dtype: str, use_trace: bool = True, log: Callable[[str], None] | None = None) -> None:
        super().__init__(model.config, device_name, dtype, max_seq_len, n_slots)
        self.ttnn, self.model = ttnn, model
        self.tokens = torch.zeros(n_slots, model.cache_len, dtype=torch.int32)  # what each slot's positions hold
        self.use_trace = use_trace
        self.timings = Timings()
        self._log = log or (lambda text: None)
        self._warm = False
        self._traces: dict[int, _Trace] = {}
        self._trace_inputs: dict[str, Any] | None = None  # persistent device inputs every trace reads
        self.opened: OpenDevice | None = None  # the device context, where this runner's loader opened it

    @classmethod
    def from_hf_weights(cls, config: ModelConfig, hf_weights: dict[str, Tensor], *, ttnn: Any, device: Any,
                        n_devices: int = 1, dtype: str = "bfloat16", n_slots: int = 1, max_seq_len: int | None = None,
                        device_name: str = "tt", use_trace: bool = True,
                        log: Callable[[str], None] | None = None) -> "TtnnRunner":
        max_seq_len = cls.context_length(config, max_seq_len)
        dtype = weight_dtype(dtype)
        began = time.perf_counter()
        model = TtModel(ttnn, device, n_devices, config, hf_weights, getattr(ttnn, dtype), n_slots, max_seq_len)
        runner = cls(ttnn, model, n_slots, max_seq_len, device_name=device_name, dtype=dtype, use_trace=use_trace,
                     log=log)
        runner.timings.load_s = time.perf_counter() - began
        return runner

    # --- compute -----------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        tokens: Sequence[int] | Tensor,
        positions: Sequence[int] | Tensor | int,
        slot: int = 0,
        last: int | None = None,
        *,
        prompt_pass: bool = False,  # one kernel for every pass here: a window of 32 positions per tile
    ) -> Tensor:
        """As RunnerBase.forward."""
        tokens, start = self.check_forward(tokens, positions, slot, last)
        count = tokens.numel()
        self.tokens[slot, start : start + count] = tokens.to(torch.int32)
        base = start // TILE * TILE
        width = round_up(start + count - base)
        # positions past start+count in the window are padding: stale ids, written past the length
        host = self.model.host_inputs(self.tokens[slot, base : base + width], base)
        rows = slice(start - base + count - (last or count), start - base + count)
        began = time.perf_counter()
        if width == TILE and self.use_trace and self._warm:
            logits = self._replay(slot, base, host, rows)
        else:
            logits = self._eager(slot, base, host, rows)
            if width == TILE and not self._warm:
                self._warm, self.timings.warmup_s = True, time.perf_counter() - began
                self._log(f"warm-up: first {TILE}-position window {self.timings.warmup_s:.2f} s (kernels compiled)")
            else:
                self.timings.eager.append(time.perf_counter() - began)
        self.slot_table.set_length(slot, start + count)
        return logits

    def _eager(self, slot: int, base: int, host: dict[str, Tensor], rows: slice) -> Tensor:
        inputs = self.model.device_inputs(host)
        out = self.model.forward(inputs, slot, base)
        logits = self.model.logits_to_host(out, rows)
        for tensor in (*inputs.values(), out):
            self.ttnn.deallocate(tensor)
        return logits

    def _replay(self, slot: int, base: int, host: dict[str, Tensor], rows: slice) -> Tensor:
        ttnn, device = self.ttnn, self.model.device
        if self._trace_inputs is None:
            self._trace_inputs = self.model.device_inputs(host)
        else:
            self.model.copy_inputs(host, self._trace_inputs)
        trace = self._traces.get(slot)
        if trace is None or trace.base != base:
            if trace is not None:
                self._release(trace)
            began = time.perf_counter()
            trace_id = ttnn.begin_trace_capture(device, cq_id=0)
            logits = self.model.forward(self._trace_inputs, slot, base)
            ttnn.end_trace_capture(device, trace_id, cq_id=0)
            self._traces[slot] = trace = _Trace(base, trace_id, logits)
            self.timings.captures.append(time.perf_counter() - began)
            if len(self.timings.captures) == 1:
                self._log(f"decode trace captured in {1000 * self.timings.captures[0]:.1f} ms "
                          f"(recaptured per slot every {TILE} positions)")
        began = time.perf_counter()
        ttnn.execute_trace(device, trace.trace_id, cq_id=0, blocking=False)
        logits = self.model.logits_to_host(trace.logits, rows)  # reading waits for the replay
        self.timings.replays.append(time.perf_counter() - began)
        return logits

    def _release(self, trace: _Trace) -> None:
        self.ttnn.release_trace(self.model.device, trace.trace_id)
        self.ttnn.deallocate(trace.logits)

    def release(self) -> None:
        """Frees traces and device buffers; the device itself is closed by its owner."""
        for trace in self._traces.values():
            self._release(trace)
        self._traces.clear()
        for tensor in (self._trace_inputs or {}).values():
            self.ttnn.deallocate(tensor)
        self._trace_inputs = None
        self.model.release()


def open_runner(spec: WorkerSettings, log: Callable[[str], None]) -> TtnnRunner | None:
    """The worker's ttnn runner, its device opened for this process alone; None: this worker stays on torch.

    Fails fast with a DeviceError when the chip is absent (before ttnn is even imported) or ttnn is
    not installed. The device is closed at exit, after the traces and buffers are released.
    """
    device = parse_device(spec.device, spec.role)
    if device is None:
        return None
    dtype = weight_dtype(spec.dtype)
    check_chips_present(device)
    isolate_process(device, spec.role)
    ttnn = import_ttnn()
    opened = open_device(ttnn, device, trace_region_size=TRACE_REGION_BYTES)
    try:
        config = read_config(spec.checkpoint)
        hf_weights = read_hf_weights(spec.checkpoint)
        check_weight_names(config, hf_weights, spec.checkpoint)
        runner = TtnnRunner.from_hf_weights(
            config, hf_weights, ttnn=ttnn, device=opened.handle, n_devices=opened.n_devices, dtype=dtype,
            n_slots=spec.slots, max_seq_len=spec.max_seq_len or None, device_name=str(device), log=log,
            use_trace=simulator_library() is None)  # tt-metal traces need fast dispatch, which the simulator lacks
    except BaseException:
        opened.close()
        raise
    runner.opened, runner.timings.open_s = opened, opened.open_s
    opened.on_close.append(runner.release)
    opened.on_close.append(lambda: log(f"ttnn timings: {runner.timings.summary()}"))
    log(f"{Path(spec.checkpoint).name} on {device} ({opened.n_devices} chip(s), {dtype} weights), {device_kind()}: "
        f"device open {opened.open_s:.2f} s, weights {runner.timings.load_s:.2f} s"
        + ("" if runner.use_trace else "; decode runs eagerly (no traces in slow dispatch)"))
    return runner


def stderr_log(role: str) -> Callable[[str], None]:
    return lambda text: print(f"[{role}] {text}", file=sys.stderr, flush=True)
