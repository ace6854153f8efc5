"""A Llama-family decoder as a graph of ttnn ops, tensor-parallel over the chips of a mesh.

Every ttnn call goes through the `ttnn` module object the model is given, so the tests can hand it a
torch-backed stand-in (tests/workers/model/ttnn_standin.py) that implements exactly these calls.

Work is done in windows of whole tiles. A forward over positions start..start+T-1 of a slot runs the
tile-aligned window [base, base + W) that holds them (base = start rounded down to 32, W a multiple
of 32), feeding again the tokens at base..start-1 that the slot already holds. That keeps every
write to the KV cache a tile-aligned `fill_cache`, and makes a one-token decode the same 32-row
computation a tile would cost anyway. Keys past the slot's length are never attended (the mask) and
get overwritten, so rolling a slot back is only moving its length.

Tensor parallelism (Megatron): each chip holds 1/n of the query and KV heads (its columns of q|k|v),
1/n of the FFN (its columns of gate and up, its rows of down) and 1/n of the vocabulary; the outputs
of o_proj and down_proj are summed across chips with one all_reduce each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workers.errors import UnsupportedModelError
from workers.model.config import ModelConfig
from workers.model.llama import rope_inverse_frequencies

TILE = 32
MASKED = -1e9  # additive mask value; finite, so a key chunk that is all masked cannot turn the softmax into NaN


def round_up(n: int, multiple: int = TILE) -> int:
    return -(-n // multiple) * multiple


def check_supported(config: ModelConfig, n_devices: int) -> None:
    if config.o_bias or config.mlp_bias:
        raise UnsupportedModelError("the ttnn runner has no o_proj/mlp biases; use --backend torch for this model")
    if config.head_dim % (2 * TILE) or config.hidden_size % TILE:
        # rotary_embedding rotates half a head against the other half: each half whole tiles
        raise UnsupportedModelError(
            f"the ttnn runner needs head_dim in whole {2 * TILE}s and hidden_size in whole {TILE}s "
            f"(got {config.head_dim} and {config.hidden_size}); use --backend torch for this model")
    if config.num_kv_heads % n_devices or config.intermediate_size % (TILE * n_devices):
        raise UnsupportedModelError(
            f"{config.num_kv_heads} KV heads and FFN width {config.intermediate_size} do not split over {n_devices} "
            f"chips; use a mesh whose size divides the KV heads (e.g. tt:0 for one chip)")


@dataclass(frozen=True)
class HostWeight:
    """A weight in the layout the device wants, before upload."""

    tensor: Tensor  # 4-D
    shard_dim: int | None  # mesh dimension split over the chips; None = the same on every chip
    matrix: bool  # a matmul operand (TILE, the weight dtype); otherwise bf16 ROW_MAJOR (embedding, norm gains)


def host_weights(config: ModelConfig, hf: dict[str, Tensor], n_devices: int) -> dict[str, HostWeight]:
    """HF tensors -> the ttnn layout: matrices [1, 1, in, out], q|k|v grouped by chip, vocab padded to tiles."""
    n = n_devices

    def matrix(weight: Tensor, shard_dim: int | None) -> HostWeight:  # HF [out, in] -> [1, 1, in, out]
        return HostWeight(weight.t().contiguous()[None, None], shard_dim, True)

    def gain(weight: Tensor) -> HostWeight:  # [d] -> [1, 1, d/32, 32], as ttnn.rms_norm takes it
        return HostWeight(weight.reshape(1, 1, -1, TILE), None, False)

    def per_chip_qkv(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # rows [q heads | kv heads | kv heads] -> chip by chip [q_i | k_i | v_i], so a column split hands
        # each chip whole heads in the order nlp_create_qkv_heads reads them
        parts = [x.reshape(n, -1, *x.shape[1:]) for x in (q, k, v)]
        return torch.cat([torch.cat([p[i] for p in parts]) for i in range(n)])

    vocab = round_up(config.vocab_size, TILE * n)
    head = hf["model.embed_tokens.weight"] if config.tie_word_embeddings else hf["lm_head.weight"]
    head = torch.cat([head, head.new_zeros(vocab - config.vocab_size, head.shape[1])])
    out = {
        "embed": HostWeight(hf["model.embed_tokens.weight"][None, None], None, False),
        "norm": gain(hf["model.norm.weight"]),
        "lm_head": matrix(head, -1 if n > 1 else None),
    }
    col, row = (-1, -2) if n > 1 else (None, None)
    for i in range(config.num_layers):
        attn, mlp, layer = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"layers.{i}."
        qkv = per_chip_qkv(*(hf[attn + f"{p}_proj.weight"] for p in "qkv"))
        out[layer + "attn_norm"] = gain(hf[f"model.layers.{i}.input_layernorm.weight"])
        out[layer + "wqkv"] = matrix(qkv, col)
        if config.qkv_bias:
            bias = per_chip_qkv(*(hf[attn + f"{p}_proj.bias"][:, None] for p in "qkv"))
            out[layer + "bqkv"] = HostWeight(bias.reshape(1, 1, 1, -1), col, True)
        out[layer + "wo"] = matrix(hf[attn + "o_proj.weight"], row)
        out[layer + "ffn_norm"] = gain(hf[f"model.layers.{i}.post_attention_layernorm.weight"])
        out[layer + "w1"] = matrix(hf[mlp + "gate_proj.weight"], col)
        out[layer + "w3"] = matrix(hf[mlp + "up_proj.weight"], col)
        out[layer + "w2"] = matrix(hf[mlp + "down_proj.weight"], row)
    return out


def rope_tables(config: ModelConfig, length: int) -> tuple[Tensor, Tensor]:
    """cos, sin [length, head_dim] in the rotate-half layout that ttnn.experimental.rotary_embedding uses."""
    inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class TtModel:
    """The weights and KV cache on a device (or mesh), and the window forward over them."""

    def __init__(self, ttnn: Any, device: Any, n_devices: int, config: ModelConfig, hf: dict[str, Tensor],
                 weight_dtype: Any, n_slots: int, max_seq_len: int) -> None:
        check_supported(config, n_devices)
        self.ttnn, self.device, self.n_devices, self.config = ttnn, device, n_devices, config
        self.cache_len = round_up(max_seq_len)
        self.vocab_padded = round_up(config.vocab_size, TILE * n_devices)
        self.compute = ttnn.WormholeComputeKernelConfig(
            math_fidelity=ttnn.MathFidelity.HiFi4, math_approx_mode=False, fp32_dest_acc_en=True, packer_l1_acc=True)
        self.sdpa_config = ttnn.SDPAProgramConfig(
            compute_with_storage_grid_size=device.compute_with_storage_grid_size(),
            q_chunk_size=TILE, k_chunk_size=TILE, exp_approx_mode=False)
        self.w = {name: self._upload(weight, weight_dtype) for name, weight in host_weights(config, hf, n_devices).items()}
        # KV cache: per layer and slot, [1, kv_heads, cache_len, head_dim], the heads split over the chips
        shape = (1, config.num_kv_heads, self.cache_len, config.head_dim)
        self.k_cache = [[self._zeros(shape) for _ in range(n_slots)] for _ in range(config.num_layers)]
        self.v_cache = [[self._zeros(shape) for _ in range(n_slots)] for _ in range(config.num_layers)]
        self.cos, self.sin = rope_tables(config, self.cache_len)

    # --- placement ---------------------------------------------------------------------------

    def mapper(self, shard_dim: int | None) -> Any:
        if self.n_devices == 1:
            return None
        if shard_dim is None:
            return self.ttnn.ReplicateTensorToMesh(self.device)
        return self.ttnn.ShardTensorToMesh(self.device, dim=shard_dim)

    def _upload(self, weight: HostWeight, weight_dtype: Any) -> Any:
        ttnn = self.ttnn
        dtype, layout = (weight_dtype, ttnn.TILE_LAYOUT) if weight.matrix else (ttnn.bfloat16, ttnn.ROW_MAJOR_LAYOUT)
        if weight.tensor.shape[-2] == 1 and weight.matrix:
            dtype = ttnn.bfloat16  # a bias row: block-float formats share exponents down a tile's rows
        return ttnn.from_torch(weight.tensor.to(torch.bfloat16), dtype=dtype, layout=layout, device=self.device,
                               memory_config=ttnn.DRAM_MEMORY_CONFIG, mesh_mapper=self.mapper(weight.shard_dim))

    def _zeros(self, shape: tuple[int, ...]) -> Any:
        ttnn = self.ttnn
        return ttnn.from_torch(torch.zeros(shape, dtype=torch.bfloat16), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                               device=self.device, memory_config=ttnn.DRAM_MEMORY_CONFIG, mesh_mapper=self.mapper(1))

    # --- inputs ------------------------------------------------------------------------------

    def host_inputs(self, tokens: Tensor, base: int) -> dict[str, Tensor]:
        """Host tensors for a window of W tokens at positions base..base+W-1.

        ids [1, W]; cos, sin [1, 1, W, hd]; mask [1, 1, W, cache_len]: row t sees keys 0..base+t.
        Padding rows see the same keys as real ones would at their position and are thrown away.
        """
        width = tokens.shape[0]
        positions = torch.arange(base, base + width).clamp(max=self.cache_len - 1)
        keys = torch.arange(self.cache_len)
        mask = torch.where(keys[None, :] <= positions[:, None], 0.0, MASKED)
        return {"ids": tokens.to(torch.int32)[None], "cos": self.cos[positions][None, None],
                "sin": self.sin[positions][None, None], "mask": mask[None, None]}

    def device_inputs(self, host: dict[str, Tensor]) -> dict[str, Any]:
        ttnn = self.ttnn
        replicate = self.mapper(None)
        return {
            "ids": ttnn.from_torch(host["ids"], dtype=ttnn.uint32, layout=ttnn.ROW_MAJOR_LAYOUT, device=self.device,
                                   memory_config=ttnn.DRAM_MEMORY_CONFIG, mesh_mapper=replicate),
            **{name: ttnn.from_torch(host[name], dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=self.device,
                                     memory_config=ttnn.DRAM_MEMORY_CONFIG, mesh_mapper=replicate)
               for name in ("cos", "sin", "mask")},  # SDPA wants its mask in DRAM
        }

    def copy_inputs(self, host: dict[str, Tensor], into: dict[str, Any]) -> None:
        """Writes new inputs into persistent device tensors (those a captured trace reads)."""
        ttnn = self.ttnn
        replicate = self.mapper(None)
        for name, tensor in host.items():
            dtype, layout = (ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT) if name == "ids" else (ttnn.bfloat16, ttnn.TILE_LAYOUT)
            staged = ttnn.from_torch(tensor, dtype=dtype, layout=layout, mesh_mapper=replicate)
            ttnn.copy_host_to_device_tensor(staged, into[name])

    def logits_to_host(self, logits: Any, rows: slice) -> Tensor:
        ttnn = self.ttnn
        composer = None if self.n_devices == 1 else ttnn.ConcatMeshToTensor(self.device, dim=-1)
        full = ttnn.to_torch(logits, mesh_composer=composer)  # [1, 1, W, vocab_padded]
        return full.reshape(-1, self.vocab_padded)[rows, : self.config.vocab_size].float()

    # --- the graph ---------------------------------------------------------------------------

    def forward(self, inputs: dict[str, Any], slot: int, base: int) -> Any:
        """Logits [1, 1, W, vocab/n] on the device for the window at `base`; writes its K/V into `slot`."""
        ttnn, config, w = self.ttnn, self.config, self.w
        n_heads, n_kv = config.num_heads // self.n_devices, config.num_kv_heads // self.n_devices
        width = inputs["ids"].shape[-1]
        x = ttnn.embedding(inputs["ids"], w["embed"], layout=ttnn.TILE_LAYOUT)  # [1, W, d]
        x = ttnn.reshape(x, (1, 1, width, config.hidden_size))
        for i in range(config.num_layers):
            layer = f"layers.{i}."
            h = ttnn.rms_norm(x, epsilon=config.rms_norm_eps, weight=w[layer + "attn_norm"],
                              compute_kernel_config=self.compute)
            qkv = ttnn.linear(h, w[layer + "wqkv"], bias=w.get(layer + "bqkv"), compute_kernel_config=self.compute)
            q, k, v = ttnn.experimental.nlp_create_qkv_heads(qkv, num_heads=n_heads, num_kv_heads=n_kv,
                                                             transpose_k_heads=False)  # [1, heads, W, hd]
            q = ttnn.experimental.rotary_embedding(q, inputs["cos"], inputs["sin"])
            k = ttnn.experimental.rotary_embedding(k, inputs["cos"], inputs["sin"])
            k_cache, v_cache = self.k_cache[i][slot], self.v_cache[i][slot]
            ttnn.fill_cache(k_cache, k, 0, update_idx=base)
            ttnn.fill_cache(v_cache, v, 0, update_idx=base)
            attn = ttnn.transformer.scaled_dot_product_attention(
                q, k_cache, v_cache, attn_mask=inputs["mask"], is_causal=False, scale=config.head_dim**-0.5,
                program_config=self.sdpa_config, compute_kernel_config=self.compute)  # [1, n_heads, W, hd]
            attn = ttnn.experimental.nlp_concat_heads(attn)  # [1, 1, W, n_heads * hd]
            x = ttnn.add(x, self._reduce(ttnn.linear(attn, w[layer + "wo"], compute_kernel_config=self.compute)))
            h = ttnn.rms_norm(x, epsilon=config.rms_norm_eps, weight=w[layer + "ffn_norm"],
                              compute_kernel_config=self.compute)
            gate = ttnn.linear(h, w[layer + "w1"], compute_kernel_config=self.compute)
            up = ttnn.linear(h, w[layer + "w3"], compute_kernel_config=self.compute)
            hidden = ttnn.mul(ttnn.silu(gate), up)
            x = ttnn.add(x, self._reduce(ttnn.linear(hidden, w[layer + "w2"], compute_kernel_config=self.compute)))
        x = ttnn.rms_norm(x, epsilon=config.rms_norm_eps, weight=w["norm"], compute_kernel_config=self.compute)
        return ttnn.linear(x, w["lm_head"], compute_kernel_config=self.compute)  # [1, 1, W, vocab/n]

    def _reduce(self, partial: Any) -> Any:
        # row-parallel matmul outputs are partial sums, one per chip
        return partial if self.n_devices == 1 else self.ttnn.all_reduce(partial)

    def release(self) -> None:
        for tensor in [*self.w.values(), *(t for row in self.k_cache + self.v_cache for t in row)]:
            self.ttnn.deallocate(tensor)
