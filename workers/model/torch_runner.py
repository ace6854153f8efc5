"""ModelRunner: a torch model over its KV slots, on a CPU or a CUDA GPU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from workers.backends.cpu_fp16 import FP16_WEIGHTS, PackedFp16, fp16_weights_available, install_packed
from workers.backends.cpu_rows import invariant_rows
from workers.backends.torch_device import resolve_device, resolve_dtype
from workers.errors import CheckpointError, DeviceError
from workers.model.checkpoint import check_weight_names, read_config, read_hf_weights
from workers.model.config import ModelConfig
from workers.model.llama import StoredMatrix, Transformer, prepared_weights
from workers.model.runner_base import RunnerBase
from workers.model.segment import Segment


class ModelRunner(RunnerBase):
    """The torch Transformer (llama.py) over `n_slots` KV slots; slots and checks are RunnerBase's."""

    scratch_rows = True

    def __init__(self, config: ModelConfig, model: Transformer, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(config, device, dtype, model.max_seq_len, model.k_cache.shape[1])
        self.model = model

    @property
    def numerics(self) -> str:
        return self.model.numerics()

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
        if pack_fp16 and (torch_device.type != "cpu" or not fp16_weights_available()):
            raise DeviceError(f"dtype {FP16_WEIGHTS!r} needs a CPU with a C compiler (specpipe's kernels) or fbgemm "
                              "(AVX2); use --dtype float32")
        torch_dtype = torch.float32 if pack_fp16 else resolve_dtype(dtype)
        if torch_device.type == "cuda":
            # cuDNN's attention plans a graph per key length, i.e. anew at every decode step; flash and
            # memory-efficient attention have no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)
        max_seq_len = cls.context_length(config, max_seq_len)
        with torch.device("meta"):
            model = Transformer(config)  # parameters without memory; the checkpoint supplies them
        expected = set(model.state_dict())
        loaded: set[str] = set()
        biases = {(id(module), weight): bias for module, weight, bias in model.matrices()}
        # A group (the embedding and head, then a layer) at a time, each packed before the next is read: the
        # loader never holds the checkpoint twice, nor its matrices in fp32 all at once. For the CPU kernels a
        # matrix goes from its stored [out, in] layout straight into their panels.
        for group in prepared_weights(config, hf_weights):
            stored = {name: value for name, value in group.items() if isinstance(value, StoredMatrix)}
            if not pack_fp16:
                group = {**group, **{name: matrix.in_out() for name, matrix in stored.items()}}
                stored = {}
            state = {name: value.to(torch_device, torch_dtype) for name, value in group.items() if name not in stored}
            del group
            unexpected = (state.keys() | stored.keys()) - expected
            if unexpected:
                raise CheckpointError(f"weights do not match the model: unexpected {sorted(unexpected)[:5]}")
            try:
                model.load_state_dict(state, strict=False, assign=True)
            except RuntimeError as error:  # shape mismatches
                raise CheckpointError(f"weights do not match config.json: {str(error).splitlines()[-1].strip()}") from None
            for name, matrix in stored.items():
                module_name, _, weight = name.rpartition(".")
                module = model.get_submodule(module_name) if module_name else model
                expected_shape = getattr(module, weight).shape  # [in, out], still on the meta device
                if len({part.shape[1] for part in matrix.parts}) > 1 or matrix.shape[::-1] != tuple(expected_shape):
                    raise CheckpointError(f"weights do not match config.json: {name} is "
                                          f"{[tuple(part.shape) for part in matrix.parts]}, the model wants "
                                          f"{tuple(expected_shape[::-1])}")
                bias = biases[(id(module), weight)]
                install_packed(module, weight, bias, PackedFp16.from_rows(
                    list(matrix.parts), matrix.scale, getattr(module, bias) if bias else None))
            loaded |= state.keys() | stored.keys()
            del state, stored
        missing = sorted(expected - loaded)
        if missing:
            raise CheckpointError(f"weights do not match the model: missing {missing[:5]}")
        if not pack_fp16 and torch_device.type == "cpu":
            model.gemm_rows = invariant_rows(
                (getattr(module, weight).shape for module, weight, _ in model.matrices()), torch_dtype)
        model.setup_caches(n_slots, max_seq_len, torch_dtype, torch_device)
        if pack_fp16:
            model.attach_native_decoder()
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
        """As RunnerBase.forward: one appended segment."""
        tokens, start = self.check_forward(tokens, positions, slot, last)
        return self._forward_checked([Segment(slot, tokens, start, logits=last or tokens.numel(),
                                              prompt_pass=prompt_pass)])[0]

    @torch.inference_mode()
    def forward_batch(self, segments: Sequence[Segment]) -> list[Tensor]:
        """Every segment in one pass: the weights are read once for all their rows (continuous batching), each
        segment attends to its own slot, and each row comes out exactly as it would in a pass of its own."""
        return self._forward_checked(self.check_segments(segments))

    def _forward_checked(self, segments: list[Segment]) -> list[Tensor]:
        if self.device.type != "cpu":
            device = self.device
            segments = [Segment(s.slot, s.tokens.to(device, non_blocking=True), s.write_at,
                                None if s.positions is None else s.positions.to(device),
                                None if s.mask is None else s.mask.to(device), s.logits, s.prompt_pass)
                        for s in segments]
        logits = self.model(segments)
        for segment in segments:
            if not segment.scratch:
                self.slot_table.set_length(segment.slot, segment.write_at + segment.rows)
        return [rows.float() for rows in logits]

    def scratch_forward(self, tokens: Sequence[int], positions: Sequence[int], slot: int, write_at: int,
                        mask: Tensor) -> Tensor:
        """Logits [T, vocab] for T tokens that need not form one sequence (a step of several drafted branches):
        one scratch segment (see workers.model.segment).

        Token i is rotated for position positions[i], writes its keys and values to cache index
        write_at + i and attends to the indices where mask[i] is True (mask [T, write_at + T], bool).
        write_at must be at or past the slot's length L, which stays L: what is written there is scratch
        that later calls overwrite, so a caller drafting step after step writes each step at the next
        indices and widens its mask to see the earlier ones.
        """
        tokens = self.check_tokens(tokens)
        return self.forward_batch([Segment(slot, tokens, write_at, torch.as_tensor(positions, dtype=torch.long),
                                           mask, logits=tokens.numel())])[0]
