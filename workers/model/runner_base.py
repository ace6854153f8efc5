"""RunnerBase: what every model runner shares, whatever computes its forward: slots and argument checks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from workers.errors import CacheCapacityError
from workers.model.config import ModelConfig
from workers.model.segment import Segment
from workers.model.slot_table import SlotTable


class RunnerBase(ABC):
    """A model over `n_slots` independent sequences, each with its own KV slot of `max_seq_len` positions.

    A slot's length is the number of positions whose keys and values are valid. `forward` appends (or
    overwrites from an earlier position) and `truncate` moves the length back without touching memory,
    so rejecting drafted tokens costs nothing.
    """

    scratch_rows = False  # whether `forward_batch` takes scratch segments: several drafted branches in one forward
    numerics = ""  # how the runner keeps a row's bits independent of its batch, for the worker's startup line

    def __init__(self, config: ModelConfig, device: torch.device | str, dtype: torch.dtype | str, max_seq_len: int,
                 n_slots: int) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.n_slots = n_slots
        self.slot_table = SlotTable(n_slots)

    @staticmethod
    def context_length(config: ModelConfig, max_seq_len: int | None) -> int:
        """The KV cache's positions per slot: `max_seq_len`, by default the model's whole context."""
        max_seq_len = max_seq_len or config.max_position_embeddings
        if not 1 <= max_seq_len <= config.max_position_embeddings:
            raise CacheCapacityError(f"max_seq_len {max_seq_len} must be between 1 and the model's "
                                     f"max_position_embeddings ({config.max_position_embeddings})")
        return max_seq_len

    # --- slots -------------------------------------------------------------------------------

    @property
    def lengths(self) -> Sequence[int]:
        """Per slot, the positions it holds (read-only: `forward` and `truncate` move them)."""
        return self.slot_table.lengths

    def allocate_slot(self) -> int:
        return self.slot_table.allocate()

    def free_slot(self, slot: int) -> None:
        self.slot_table.free(slot)

    @property
    def free_slot_count(self) -> int:
        return self.slot_table.free_count

    def truncate(self, slot: int, length: int) -> None:
        """Rolls slot back to its first `length` positions in O(1): nothing is copied or cleared."""
        self.slot_table.truncate(slot, length)

    # --- compute -----------------------------------------------------------------------------

    @abstractmethod
    def forward(self, tokens: Sequence[int] | Tensor, positions: Sequence[int] | Tensor | int, slot: int = 0,
                last: int | None = None, *, prompt_pass: bool = False) -> Tensor:
        """Logits [T, vocab] (float32) for T tokens at consecutive positions of `slot`; the slot then holds
        the positions up to the last of them. The arguments are as `check_forward` checks them.

        `prompt_pass` says this pass reads a sequence's prompt from position 0, as every mode does alike:
        only such a pass may take a kernel whose rows depend on how many it multiplies at once. Every
        other pass must give each row exactly what reading it alone would, or verification would drift
        from target-only decoding.
        """

    def forward_batch(self, segments: Sequence[Segment]) -> list[Tensor]:
        """Logits [segment.logits, vocab] (float32) per segment; each appended segment's slot then holds the
        positions up to its last row. This runner has no batched pass: one `forward` per segment (a runner
        that batches overrides it, and takes scratch segments where `scratch_rows`)."""
        out = []
        for segment in segments:
            if segment.scratch:
                raise ValueError(f"{type(self).__name__} has no scratch rows")
            logits = self.forward(segment.tokens, segment.write_at, segment.slot, last=max(1, segment.logits),
                                  prompt_pass=segment.prompt_pass)
            out.append(logits[logits.shape[0] - segment.logits :])
        return out

    # --- checks ------------------------------------------------------------------------------

    def check_segments(self, segments: Sequence[Segment]) -> list[Segment]:
        """`forward_batch`'s segments checked, tokens as int64 tensors. Each slot appears once; an appended
        segment obeys `check_forward`'s rules; a scratch one writes at or past its slot's length with a mask
        [T, write_at + T] and positions [T] within the cache."""
        if not segments:
            raise ValueError("a batched forward needs at least one segment")
        slots = [segment.slot for segment in segments]
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot may appear once in a batched forward, got slots {slots}")
        return [self._check_segment(segment) for segment in segments]

    def _check_segment(self, segment: Segment) -> Segment:
        if segment.mask is None:
            tokens, start = self.check_forward(segment.tokens, segment.write_at, segment.slot, None)
        else:
            self.slot_table.check(segment.slot)
            tokens, start = self.check_tokens(segment.tokens), segment.write_at
            count, mask, positions = tokens.numel(), segment.mask, segment.positions
            if start < self.lengths[segment.slot] or start + count > self.max_seq_len:
                raise CacheCapacityError(f"scratch indices {start}..{start + count - 1} must lie between the slot's "
                                         f"length {self.lengths[segment.slot]} and the cache's {self.max_seq_len}")
            if tuple(mask.shape) != (count, start + count) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool [{count}, {start + count}], got {tuple(mask.shape)} {mask.dtype}")
            if positions is None or positions.numel() != count:
                raise ValueError(f"got {count} tokens but {0 if positions is None else positions.numel()} positions")
            if int(positions.min()) < 0 or int(positions.max()) >= self.max_seq_len:
                raise CacheCapacityError(f"positions must lie in [0, {self.max_seq_len})")
        if not 0 <= segment.logits <= tokens.numel():
            raise ValueError(f"logits must be between 0 and the {tokens.numel()} tokens read, got {segment.logits}")
        mask = None if segment.mask is None else segment.mask.contiguous()
        return Segment(segment.slot, tokens, start, segment.positions, mask, segment.logits, segment.prompt_pass)

    def check_forward(self, tokens: Sequence[int] | Tensor, positions: Sequence[int] | Tensor | int, slot: int,
                      last: int | None) -> tuple[Tensor, int]:
        """`forward`'s arguments checked: (tokens [T] int64, the first position).

        `positions` is the positions of the tokens, or just the first one. It may start before the
        slot's length (overwriting, i.e. an implicit truncate) but never after it, and the tokens must
        fit the KV cache. With `last`, only the final `last` positions get logits ([last, vocab]); the
        cache takes all T.
        """
        self.slot_table.check(slot)
        tokens = self.check_tokens(tokens)
        count = tokens.numel()
        start = _first_position(positions, count)
        if start > self.lengths[slot]:
            raise CacheCapacityError(
                f"position {start} would leave a gap: slot {slot} holds only {self.lengths[slot]} positions")
        if start + count > self.max_seq_len:
            raise CacheCapacityError(
                f"positions {start}..{start + count - 1} are beyond the KV cache of {self.max_seq_len} positions "
                f"(the model's context); shorten the prompt or generate fewer tokens")
        if last is not None and not 1 <= last <= count:
            raise ValueError(f"last must be between 1 and the {count} tokens read, got {last}")
        return tokens, start

    def check_tokens(self, tokens: Sequence[int] | Tensor) -> Tensor:
        """Token ids [T] int64: a non-empty 1-D sequence within the vocabulary."""
        if isinstance(tokens, list) and tokens and all(type(token) is int for token in tokens):
            # a list of ints (as the cores pass them) is checked in Python: quicker than three tensor ops
            if min(tokens) < 0 or max(tokens) >= self.config.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
            return torch.from_numpy(np.array(tokens, dtype=np.int64))
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.ndim != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty 1-D sequence, got shape {tuple(tokens.shape)}")
        if int(tokens.max()) >= self.config.vocab_size or int(tokens.min()) < 0:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return tokens


def _first_position(positions: Sequence[int] | Tensor | int, count: int) -> int:
    if isinstance(positions, int):
        start = positions
    else:
        positions = torch.as_tensor(positions, dtype=torch.long).flatten()
        if positions.numel() != count:
            raise ValueError(f"got {count} tokens but {positions.numel()} positions")
        start = int(positions[0])
        if count > 1 and not torch.equal(positions, torch.arange(start, start + count)):
            raise ValueError("positions must be consecutive")
    if start < 0:
        raise ValueError(f"positions must be non-negative, got {start}")
    return start
