"""Segment: the rows one sequence contributes to a batched forward pass.

A batched pass multiplies the rows of every segment together (the weights are read once for all of
them) and gives each segment its own attention over its own KV slot. A segment is ragged: its own
slot, positions and row count. Three kinds of pass are segments:

  appended   the rows extend the slot at cache indices write_at.. (a prefill chunk, a decode step,
             a verification window); the slot then holds write_at + T positions;
  scratch    rows written past the slot's length that do not extend it (drafted-ahead branches: each
             row rotated for its own position, seeing the cache indices its mask row allows).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Segment:
    slot: int
    tokens: Tensor  # [T] int64
    write_at: int  # cache index of the first row: row i writes its keys and values at write_at + i
    positions: Tensor | None = None  # [T] rotary positions (scratch rows); None = write_at + i
    mask: Tensor | None = None  # [T, write_at + T] bool: row i sees index j where True (scratch); None = causal
    logits: int = 1  # logits wanted for the final `logits` rows (0 = none: a prefill chunk)
    prompt_pass: bool = False  # the rows are a chunk of the prompt (a backend may pick its prefill kernel)

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def scratch(self) -> bool:
        return self.mask is not None
