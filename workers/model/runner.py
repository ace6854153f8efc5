"""ModelRunner: a torch model over its KV slots, on a CPU or a CUDA GPU."""

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
from workers.model.runner_base import RunnerBase


class ModelRunner(RunnerBase):
    """The torch Transformer (llama.py) over `n_slots` KV slots; slots and checks are RunnerBase's."""

    scratch_rows = True

    def __init__(self, config: ModelConfig, model: Transformer, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(config, device, dtype, model.max_seq_len, model.k_cache.shape[1])
        self.model = model

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
            # cuDNN's attention plans a graph per key length, i.e. anew at every decode step; flash and
            # memory-efficient attention have no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)
        max_seq_len = cls.context_length(config, max_seq_len)
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
        """As RunnerBase.forward; a prompt's pass may take `--dtype fp16-weights`' prefill GEMM."""
        tokens, start = self.check_forward(tokens, positions, slot, last)
        if prompt_pass and start != 0:
            raise ValueError(f"a prompt's pass starts at position 0, not {start}")
        logits = self.model(tokens.to(self.device, non_blocking=True), start, slot, last, prompt_pass=prompt_pass)
        self.slot_table.set_length(slot, start + tokens.numel())
        return logits.float()

    @torch.inference_mode()
    def scratch_forward(self, tokens: Sequence[int], positions: Sequence[int], slot: int, write_at: int,
                        mask: Tensor) -> Tensor:
        """Logits [T, vocab] for T tokens that need not form one sequence (a step of several drafted branches).

        Token i is rotated for position positions[i], writes its keys and values to cache index
        write_at + i and attends to the indices where mask[i] is True (mask [T, write_at + T], bool).
        write_at must be at or past the slot's length L, which stays L: what is written there is scratch
        that later calls overwrite, so a caller drafting step after step writes each step at the next
        indices and widens its mask to see the earlier ones.
        """
        self.slot_table.check(slot)
        tokens = self.check_tokens(tokens)
        count = tokens.numel()
        if len(positions) != count:
            raise ValueError(f"got {count} tokens but {len(positions)} positions")
        if write_at < self.lengths[slot] or write_at + count > self.max_seq_len:
            raise CacheCapacityError(f"scratch indices {write_at}..{write_at + count - 1} must lie between the "
                                     f"slot's length {self.lengths[slot]} and the cache's {self.max_seq_len}")
        if tuple(mask.shape) != (count, write_at + count) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool [{count}, {write_at + count}], got {tuple(mask.shape)} {mask.dtype}")
        positions = torch.as_tensor(positions, dtype=torch.long)
        if int(positions.min()) < 0 or int(positions.max()) >= self.max_seq_len:
            raise CacheCapacityError(f"positions must lie in [0, {self.max_seq_len})")
        logits = self.model(tokens.to(self.device), write_at, slot, positions=positions.to(self.device),
                            mask=mask.to(self.device))
        return logits.float()
