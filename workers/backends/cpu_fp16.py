"""`--dtype fp16-weights` on a CPU: weights held in fp16 and multiplied by fbgemm with fp32 activations.

On one CPU thread MKL's fp32 sgemm is slow for the 2-9 rows of a verification window; fbgemm's fp16
kernel reads half the bytes and keeps a k-token pass close to a one-token pass. A prefill of many rows
is compute-bound instead, so a prompt's pass of PREFILL_ROWS rows or more takes oneDNN's bf16 GEMM
where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), else MKL on an fp32 copy (figures in
docs/notes.md).

Losslessness rests on which kernel a pass takes. Target-only decodes each position alone, so every
row of a verification window must come out exactly as it would one at a time: fbgemm's rows do at
any row count, the two prefill kernels' change with the number of rows. So only a pass the caller
marks as a prompt's (`prompt_pass`: the prompt read from position 0, which every mode sends alike)
may take the prefill kernel; every other pass runs fbgemm, however many rows it has.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

FP16_WEIGHTS = "fp16-weights"  # the --dtype that selects this backend


class PackedFp16:
    """A matrix packed for fbgemm's fp16-weight GEMM: y = x @ W + b, fp32 activations and accumulation."""

    PREFILL_ROWS = 32

    def __init__(self, weight_in_out: Tensor, bias: Tensor | None) -> None:
        self.packed = torch.fbgemm_pack_gemm_matrix_fp16(weight_in_out.float().t().contiguous())
        self.bias = torch.zeros(weight_in_out.shape[1]) if bias is None else bias.float()
        self.has_bias = bias is not None
        if native_bf16_gemm():
            self.long_weight = torch.ops.mkldnn._reorder_linear_weight(weight_in_out.t().contiguous().bfloat16(), None)
        else:
            self.long_weight = weight_in_out.float().contiguous()  # [in, out], for MKL

    def __call__(self, x: Tensor, prompt_pass: bool = False) -> Tensor:
        # x: [rows, in] -> [rows, out]
        if x.shape[0] < self.PREFILL_ROWS or not prompt_pass:
            return torch.fbgemm_linear_fp16_weight(x, self.packed, self.bias)
        if self.long_weight.dtype == torch.float32:
            return torch.addmm(self.bias, x, self.long_weight)
        y = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), self.long_weight, None, "none", [], "").float()
        return y + self.bias if self.has_bias else y


def pack_fp16_weights(modules: Iterable[tuple[nn.Module, str, str | None]]) -> None:
    """Swaps each (module, weight name, bias name) matrix for its fbgemm fp16 packing; the bias goes with it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks the fbgemm fp16 ops deprecated; they are still there
        for module, weight, bias in modules:
            packed = PackedFp16(getattr(module, weight), getattr(module, bias) if bias else None)
            for name in (weight, bias):
                if name:
                    module._parameters.pop(name, None)
            setattr(module, weight, packed)
            if bias:
                setattr(module, bias, None)


@functools.cache
def native_bf16_gemm() -> bool:
    """Whether oneDNN multiplies bf16 in hardware here (AVX512-BF16 or AMX), not by emulation."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and _cpu_flags() & {"avx512_bf16", "amx_bf16"})
    except (RuntimeError, AttributeError):
        return False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def fbgemm_fp16_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PackedFp16(torch.ones(8, 8), None)(torch.ones(1, 8))
        return True
    except (RuntimeError, AttributeError):
        return False
