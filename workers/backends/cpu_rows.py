"""Which row counts a CPU GEMM may be called with so that each row comes out the same whatever shares the call.

Greedy speculative decoding is token-identical to target-only decoding only if a position's logits are
bitwise the same in a one-row decode step, a k-row verification window and a batch of many sequences.
A BLAS does not promise that: MKL picks its kernel, blocking and thread split by the row count, and
which counts agree depends on the CPU, on the code path MKL takes there and on the thread count. So
nothing is assumed: `invariant_rows` multiplies random matrices of the model's own shapes, dtype and
thread count at many row counts and offsets, and returns the widest range of counts whose rows all agree. The model pads each call up to the nearest of those counts and
splits longer ones into tiles of the largest, so every row is computed the same way in every pass.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

LEAST_CANDIDATES = (2, 4, 8, 16)  # where a range may start: a one-row call is a GEMV, a kernel of its own
PROBED_COUNTS = tuple(sorted({*range(2, 18), 24, 31, 32, 33, 48, 63, 64, 65, 96, 128, 129, 256}))
PROBED_COLUMNS = 4096  # wider matrices are probed on their first 4096 columns (MKL blocks columns alike)
WIDE_ENOUGH = 64  # past this many rows a prompt tile is compute-bound, and wider tiles gain little


@dataclass(frozen=True)
class RowRange:
    """The row counts every call is made with: a call is padded up to the nearest, and one of more rows
    than the largest is split into tiles of the largest."""

    counts: tuple[int, ...]  # ascending, all measured to agree row by row
    verified: bool = True  # False: no counts agreed here; rows may differ in their last bits between passes

    def describe(self) -> str:
        measured = "" if self.verified else " (not batch-invariant here)"
        return f"GEMM rows {self.counts[0]}..{self.counts[-1]}{measured}"

    def padded(self, count: int) -> int:
        return self.counts[bisect.bisect_left(self.counts, count)]


def padded_matmul(x: Tensor, weight: Tensor, bias: Tensor | None, rows: RowRange) -> Tensor:
    """x [R, in] @ weight [in, out] (+ bias), every call made with one of `rows.counts` rows."""
    count, widest = x.shape[0], rows.counts[-1]
    if count > widest:
        return torch.cat([padded_matmul(x[first : first + widest], weight, bias, rows)
                          for first in range(0, count, widest)])
    padded = rows.padded(count)
    if padded == count:
        return matmul(x, weight, bias)
    return matmul(torch.cat((x, x.new_zeros(padded - count, x.shape[1]))), weight, bias)[:count]


def matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight (+ bias) in one call, whatever its row count."""
    return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)


def invariant_rows(shapes: Iterable[tuple[int, int]], dtype: torch.dtype) -> RowRange:
    """The row range for [in, out] matrices of these shapes, measured at this process's thread count."""
    return _probe(tuple(sorted(set(shapes))), dtype, torch.get_num_threads())


@functools.cache
def _probe(shapes: tuple[tuple[int, int], ...], dtype: torch.dtype, threads: int) -> RowRange:
    agree = {count: set(PROBED_COUNTS) for count in PROBED_COUNTS}  # agree[a]: counts whose rows equal a's
    generator = torch.Generator().manual_seed(0)
    for in_features, out_features in shapes:
        out_features = min(out_features, PROBED_COLUMNS)
        weight = torch.randn(in_features, out_features, generator=generator).to(dtype)
        pool = torch.randn(max(PROBED_COUNTS) + 8, in_features, generator=generator).to(dtype)
        # Each count multiplies a window of the pool at its own offset, so a row sits at different
        # positions of different calls: position within the call must not matter either.
        results = {count: torch.mm(pool[count % 7 : count % 7 + count], weight) for count in PROBED_COUNTS}
        for a in PROBED_COUNTS:
            for b in list(agree[a]):
                if not _same_rows(results[a], a % 7, results[b], b % 7):
                    agree[a].discard(b)
    best: tuple[int, ...] = ()
    for least in LEAST_CANDIDATES:
        members: list[int] = []
        for count in (count for count in PROBED_COUNTS if count >= least):
            if not all(count in agree[member] for member in members):
                break  # the range ends where a count disagrees with one already in it
            members.append(count)
        if len(members) > 1 and _score(members) > _score(best):  # one count alone says nothing of position
            best = tuple(members)
    if not best:
        return RowRange(tuple(count for count in PROBED_COUNTS if 8 <= count <= WIDE_ENOUGH), verified=False)
    return RowRange(best)


def _score(counts: tuple[int, ...] | list[int]) -> tuple[int, int]:
    # Wide enough for prompt tiles first, then the least padding of decode steps.
    return (min(counts[-1], WIDE_ENOUGH), -counts[0]) if counts else (0, 0)


def _same_rows(a: Tensor, a_offset: int, b: Tensor, b_offset: int) -> bool:
    # a holds pool rows a_offset.., b holds b_offset..; compare the pool rows both hold.
    first, end = max(a_offset, b_offset), min(a_offset + a.shape[0], b_offset + b.shape[0])
    return end <= first or torch.equal(a[first - a_offset : end - a_offset], b[first - b_offset : end - b_offset])
