"""`--dtype fp16-weights` on a CPU: weights held in fp16, multiplied with fp32 activations.

Where specpipe's CPU kernels load (cpu_native), every matrix computes with them, prompts included: one
kernel whose rows are each computed alone, in fp32, whatever the row count, so nothing below is needed
(and a prompt comes out as an fp32 engine computes it). The rest of this module is the fallback where
they cannot be built or loaded (no C compiler, or SPECPIPE_CPU_KERNELS=torch):

Few-row passes (decode steps, verification windows) are bound by reading the weights, so they take
fbgemm's fp16 kernel, which reads half the bytes of an fp32 GEMM. A prefill of many rows is
compute-bound instead, so a prompt's pass of PREFILL_ROWS rows or more takes oneDNN's bf16 GEMM
where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), else MKL on an fp32 copy.

Losslessness rests on which kernel a row takes. Target-only decodes each position alone, so every
row of a verification window, and of a batch of many sequences, must come out exactly as it would
alone: fbgemm's rows do at any row count. The prefill kernels' rows change with the number of rows
multiplied at once, so they only ever multiply tiles of exactly PREFILL_TILE rows (the last one
padded), tiled from the start of each prompt chunk the caller marks (`prompt_rows`); every other row
runs fbgemm. A prompt then comes out the same whatever else shares its passes.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

from workers.backends import cpu_native
from workers.backends.cpu_features import cpu_flags

FP16_WEIGHTS = "fp16-weights"  # the --dtype that selects this backend


class PackedFp16:
    """A matrix in fp16 for specpipe's kernels (or, where they do not load, for fbgemm's, plus a copy for the
    prefill kernel): y = x @ W + b, fp32 activations and accumulation."""

    PREFILL_ROWS = 32  # a prompt tile with fewer rows is cheaper through the fp16 kernel
    PREFILL_TILE = 64  # the prefill kernel always multiplies exactly this many rows, padded

    def __init__(self, weight_in_out: Tensor, bias: Tensor | None) -> None:
        kernels = cpu_native.load()
        if isinstance(kernels, cpu_native.Kernels):  # one kernel for every row: no fbgemm, no prefill copy
            self._hold(cpu_native.PackedMatrix(kernels, weight_in_out, bias), weight_in_out.shape[1], bias)
            return
        self._hold(None, weight_in_out.shape[1], bias)
        self.packed = torch.fbgemm_pack_gemm_matrix_fp16(weight_in_out.float().t().contiguous())
        if native_bf16_gemm():
            self.long_weight = torch.ops.mkldnn._reorder_linear_weight(weight_in_out.t().contiguous().bfloat16(), None)
        else:
            self.long_weight = weight_in_out.float().contiguous()  # [in, out], for MKL

    @classmethod
    def from_rows(cls, parts: list[Tensor], scale: Tensor | None, bias: Tensor | None) -> "PackedFp16":
        """PackedFp16((torch.cat(parts).float() * scale).t(), bias) from the matrix as a checkpoint stores it (its
        parts' rows following one another): packed straight from them where the kernels load, with no copy."""
        kernels = cpu_native.load()
        if not isinstance(kernels, cpu_native.Kernels):
            weight = torch.cat(parts).float()
            return cls((weight if scale is None else weight * scale).t(), bias)
        packed = cls.__new__(cls)
        packed._hold(cpu_native.PackedMatrix.from_rows(kernels, parts, scale, bias),
                     sum(part.shape[0] for part in parts), bias)
        return packed

    def _hold(self, native: cpu_native.PackedMatrix | None, out_features: int, bias: Tensor | None) -> None:
        self.native = native
        self.bias = torch.zeros(out_features) if bias is None else bias.float()
        self.has_bias = bias is not None
        self.out_features = out_features

    def __call__(self, x: Tensor, prompt_rows: tuple[tuple[int, int], ...] = ()) -> Tensor:
        # x: [rows, in] -> [rows, out]; prompt_rows: (first, end) ranges of x that are prompt chunks
        if self.native is not None:
            return self.native(x)
        tiles = [(a, min(a + self.PREFILL_TILE, end)) for first, end in prompt_rows
                 for a in range(first, end, self.PREFILL_TILE)]
        tiles = [(a, b) for a, b in tiles if b - a >= self.PREFILL_ROWS]
        if not tiles:
            return self._fp16(x)
        if len(tiles) == 1 and tiles[0] == (0, x.shape[0]):
            return self._prefill_tile(x)
        y = x.new_empty(x.shape[0], self.out_features)
        short = torch.ones(x.shape[0], dtype=torch.bool)
        for a, b in tiles:
            y[a:b] = self._prefill_tile(x[a:b])
            short[a:b] = False
        if short.any():
            rows = short.nonzero().squeeze(1)
            y[rows] = self._fp16(x[rows])
        return y

    def _fp16(self, x: Tensor) -> Tensor:
        return torch.fbgemm_linear_fp16_weight(x, self.packed, self.bias)

    def _prefill_tile(self, x: Tensor) -> Tensor:
        # Up to PREFILL_TILE rows, padded to exactly that many: the kernel's blocking (and so each row's
        # rounding) changes with the row count, and a fixed count makes a row's result its own alone.
        count = x.shape[0]
        if count < self.PREFILL_TILE:
            x = torch.cat((x, x.new_zeros(self.PREFILL_TILE - count, x.shape[1])))
        if self.long_weight.dtype == torch.float32:
            return torch.addmm(self.bias, x, self.long_weight)[:count]
        y = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), self.long_weight, None, "none", [], "").float()[:count]
        return y + self.bias if self.has_bias else y


def install_packed(module: nn.Module, weight: str, bias: str | None, packed: PackedFp16) -> None:
    """`packed` in place of the module's matrix (and its bias, which the packing holds)."""
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
                    and cpu_flags() & {"avx512_bf16", "amx_bf16"})
    except (RuntimeError, AttributeError):
        return False


@functools.cache
def fp16_weights_available() -> bool:
    """Whether `--dtype fp16-weights` runs here: specpipe's kernels load, or fbgemm's fp16 GEMM (AVX2) works."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PackedFp16(torch.ones(8, 8), None)(torch.ones(1, 8))
        return True
    except (RuntimeError, AttributeError):
        return False
