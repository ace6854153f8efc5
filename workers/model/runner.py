"""ModelRunner: a model, its KV slots, and the bookkeeping that makes rollback O(1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from workers.backends.cpu_fp16 import FP16_WEIGHTS, fbgemm_fp16_available, pack_fp16_weights
from workers.backends.torch_device import resolve_device, resolve_dtype
from workers.errors import CacheCapacityError, CheckpointError, DeviceError
from workers.model.checkpoint import check_weight_names, read_config, read_hf_weights
from workers.model.config import ModelConfig
from workers.model.llama import Transformer, prepare_weights


class ModelRunner:
    """Runs one model over `n_slots` independent sequences, each with its own KV slot.

    A slot's length is the number of positions whose keys and values are valid. `forward` appends
    (or overwrites from an earlier position) and `truncate` moves the length back without touching
    memory, so rejecting drafted tokens costs nothing.
    """

    scratch_rows = True  # `scratch_forward` works: several drafted branches in one batched forward

    def __init__(self, config: ModelConfig, model: Transformer, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.model = model
        self.device = device
        self.dtype = dtype
        self.max_seq_len = model.max_seq_len
        self.n_slots = model.k_cache.shape[1]
        self.lengths = [0] * self.n_slots
        self._free_slots = list(range(self.n_slots - 1, -1, -1))

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        n_slots: int = 1,
        max_seq_len: int | None = None,
    ) -> "ModelRunner":
        config = read_config(directory)
        hf_weights = read_hf_weights(directory)
        check_weight_names(config, hf_weights, directory)
        return cls.from_hf_weights(config, hf_weights, device=device, dtype=dtype, n_slots=n_slots, max_seq_len=max_seq_len)

    @classmethod
    def from_hf_weights(
        cls,
        config: ModelConfig,
        hf_weights: dict[str, Tensor],
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        n_slots: int = 1,
        max_seq_len: int | None = None,
    ) -> "ModelRunner":
        torch_device = resolve_device(device)
        pack_fp16 = dtype == FP16_WEIGHTS
        if pack_fp16 and (torch_device.type != "cpu" or not fbgemm_fp16_available()):
            raise DeviceError(f"dtype {FP16_WEIGHTS!r} needs a CPU with fbgemm (AVX2); use --dtype float32")
        torch_dtype = torch.float32 if pack_fp16 else resolve_dtype(dtype)
        if torch_device.type == "cuda":
            # cuDNN's attention plans a graph per key length, i.e. anew at every decode step (9 ms of
            # CPU each on an H100); flash and memory-efficient attention have no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)
        max_seq_len = max_seq_len or config.max_position_embeddings
        if not 1 <= max_seq_len <= config.max_position_embeddings:
            raise CacheCapacityError(
                f"max_seq_len {max_seq_len} must be between 1 and the model's "
                f"max_position_embeddings ({config.max_position_embeddings})"
            )
        with torch.device("meta"):
            model = Transformer(config)  # parameters without memory; the checkpoint supplies them
        state = prepare_weights(config, hf_weights)
        try:
            missing, unexpected = model.load_state_dict(
                {k: v.to(torch_device, torch_dtype) for k, v in state.items()}, strict=False, assign=True
            )
        except RuntimeError as error:  # shape mismatches
            raise CheckpointError(f"weights do not match config.json: {str(error).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise CheckpointError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if pack_fp16:
            pack_fp16_weights(model.matrices())
        model.setup_caches(n_slots, max_seq_len, torch_dtype, torch_device)
        model.requires_grad_(False).eval()
        return cls(config, model, torch_device, torch_dtype)

    # --- slots -------------------------------------------------------------------------------

    def allocate_slot(self) -> int:
        if not self._free_slots:
            raise CacheCapacityError(f"all {self.n_slots} KV slots are in use; start the worker with more slots")
        slot = self._free_slots.pop()
        self.lengths[slot] = 0
        return slot

    def free_slot(self, slot: int) -> None:
        self._check_slot(slot)
        if slot not in self._free_slots:
            self.lengths[slot] = 0
            self._free_slots.append(slot)

    @property
    def free_slot_count(self) -> int:
        return len(self._free_slots)

    def truncate(self, slot: int, length: int) -> None:
        """Rolls slot back to its first `length` positions in O(1): nothing is copied or cleared."""
        self._check_slot(slot)
        if not 0 <= length <= self.lengths[slot]:
            raise CacheCapacityError(f"cannot truncate slot {slot} to {length}: it holds {self.lengths[slot]} positions")
        self.lengths[slot] = length

    # --- compute -----------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        tokens: Sequence[int] | Tensor,
        positions: Sequence[int] | Tensor | int,
        slot: int = 0,
        last: int | None = None,
        *,
        prompt_pass: bool = False,
    ) -> Tensor:
        """Logits [T, vocab] (float32) for T tokens at consecutive positions of `slot`.

        `positions` is the positions of the tokens, or just the first one. It may start before
        the slot's length (overwriting, i.e. an implicit truncate) but never after it. With `last`,
        only the final `last` positions get logits ([last, vocab]); the cache takes all T.

        `prompt_pass` says this pass reads a sequence's prompt from position 0, as every mode does
        alike: only such a pass may take a kernel whose rows depend on how many it multiplies at once
        (`--dtype fp16-weights`' prefill GEMM). Every other pass must give each row exactly what
        reading it alone would, or verification would drift from target-only decoding.
        """
        self._check_slot(slot)
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.ndim != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty 1-D sequence, got shape {tuple(tokens.shape)}")
        count = tokens.numel()
        start = _first_position(positions, count)
        if start > self.lengths[slot]:
            raise CacheCapacityError(
                f"position {start} would leave a gap: slot {slot} holds only {self.lengths[slot]} positions"
            )
        if start + count > self.max_seq_len:
            raise CacheCapacityError(
                f"positions {start}..{start + count - 1} are beyond the KV cache of {self.max_seq_len} positions "
                f"(the model's context); shorten the prompt or generate fewer tokens"
            )
        if int(tokens.max()) >= self.config.vocab_size or int(tokens.min()) < 0:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        if last is not None and not 1 <= last <= count:
            raise ValueError(f"last must be between 1 and the {count} tokens read, got {last}")
        if prompt_pass and start != 0:
            raise ValueError(f"a prompt's pass starts at position 0, not {start}")
        logits = self.model(tokens.to(self.device, non_blocking=True), start, slot, last, prompt_pass=prompt_pass)
        self.lengths[slot] = start + count
        return logits.float()

    @torch.inference_mode()
    def forward_rows(self, tokens: Sequence[int], positions: Sequence[int], slot: int, mask: Tensor) -> Tensor:
        """Logits [T, vocab] for T tokens that need not form one sequence (a step of several drafted branches).

        Token i is rotated for position positions[i], writes its keys and values to cache index L + i,
        L the slot's length, and attends to the indices where mask[i] is True (mask [T, L + T], bool).
        The length stays L: what is written at or past it is scratch, overwritten by later calls, so the
        caller moves on to scratch index L + T by building its next mask wider (see `scratch_forward`).
        """
        return self.scratch_forward(tokens, positions, slot, self.lengths[slot], mask)

    @torch.inference_mode()
    def scratch_forward(self, tokens: Sequence[int], positions: Sequence[int], slot: int, write_at: int,
                        mask: Tensor) -> Tensor:
        """As `forward_rows`, writing at cache indices write_at.. (at or past the slot's length)."""
        self._check_slot(slot)
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        count = tokens.numel()
        if tokens.ndim != 1 or count == 0 or len(positions) != count:
            raise ValueError(f"need as many positions as tokens (a non-empty 1-D sequence), got {count} tokens "
                             f"and {len(positions)} positions")
        if write_at < self.lengths[slot] or write_at + count > self.max_seq_len:
            raise CacheCapacityError(f"scratch indices {write_at}..{write_at + count - 1} must lie between the "
                                     f"slot's length {self.lengths[slot]} and the cache's {self.max_seq_len}")
        if tuple(mask.shape) != (count, write_at + count) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool [{count}, {write_at + count}], got {tuple(mask.shape)} {mask.dtype}")
        if int(tokens.max()) >= self.config.vocab_size or int(tokens.min()) < 0:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        positions = torch.as_tensor(positions, dtype=torch.long)
        if int(positions.min()) < 0 or int(positions.max()) >= self.max_seq_len:
            raise CacheCapacityError(f"positions must lie in [0, {self.max_seq_len})")
        logits = self.model(tokens.to(self.device), write_at, slot, positions=positions.to(self.device),
                            mask=mask.to(self.device))
        return logits.float()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise CacheCapacityError(f"slot {slot} does not exist (this runner has {self.n_slots})")


def _first_position(positions: Sequence[int] | Tensor | int, count: int) -> int:
    if isinstance(positions, int):
        return positions
    positions = torch.as_tensor(positions, dtype=torch.long).flatten()
    if positions.numel() != count:
        raise ValueError(f"got {count} tokens but {positions.numel()} positions")
    start = int(positions[0])
    if count > 1 and not torch.equal(positions, torch.arange(start, start + count)):
        raise ValueError("positions must be consecutive")
    if start < 0:
        raise ValueError(f"positions must be non-negative, got {start}")
    return start
