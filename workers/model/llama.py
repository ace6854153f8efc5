"""A Llama-family decoder for inference, in the manner of gpt-fast's model.py.

One call runs a batch of segments (workers.model.segment): each sequence's rows at its own positions
of its own KV slot, all multiplied together, each attending to its own cache. Prefill chunks,
one-token decode steps, k-token verifications and drafted-ahead branches are the same call. The KV cache is preallocated, so rolling a sequence back is just moving its
length (the runner's job): stale entries past the length are never attended and get overwritten.

On a CPU thread a small model's decode is bound by memory traffic and per-op overhead, so the
weights are laid out for it (see `prepared_weights`): q|k|v and gate|up fused into one matrix each,
stored [in, out] for `x @ W`, and each RMSNorm's gain folded into the matrix that follows it.
"""

from __future__ import annotations

import array
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.backends import cpu_native
from workers.backends.cpu_fp16 import PackedFp16
from workers.backends.cpu_rows import RowRange, matmul, padded_matmul
from workers.model.config import ModelConfig, RopeScaling
from workers.model.segment import Segment


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> Tensor:
    """Inverse frequencies [head_dim/2], as transformers' modeling_rope_utils computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@dataclass(frozen=True)
class StoredMatrix:
    """A matrix as the checkpoint stores it, [out, in], in parts whose rows follow one another (q, k and v fuse
    into one matrix), and the scale its inputs take (a folded norm gain).

    A CPU loader packs it for the kernels straight from here (PackedFp16.from_rows); `in_out` is the [in, out]
    float32 layout this module multiplies with otherwise."""

    parts: tuple[Tensor, ...]
    scale: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:  # [out, in]
        return sum(part.shape[0] for part in self.parts), self.parts[0].shape[1]

    def in_out(self) -> Tensor:
        weight = torch.cat(self.parts).float()
        return (weight if self.scale is None else weight * self.scale).t().contiguous()


def prepared_weights(config: ModelConfig, hf: Mapping[str, Tensor]) -> Iterator[dict[str, Tensor | StoredMatrix]]:
    """Hugging Face tensors (by HF name) -> this module's state dict, a group at a time (the embedding and
    head, then each layer), so that a loader can pack a group before the next is read. Matrices come as
    StoredMatrix.

    RMSNorm(x) @ W.T = (x / rms(x)) * g @ W.T = (x * rsqrt(sum(x^2) + d*eps)) @ (W * g * sqrt(d)).T,
    so the gain g and sqrt(d) move into the next matrix and the norm becomes five cheap ops.
    """
    root_d = math.sqrt(config.hidden_size)

    def folded(parts: tuple[Tensor, ...], gain: Tensor) -> StoredMatrix:
        return StoredMatrix(parts, gain.float() * root_d)

    head = hf["model.embed_tokens.weight"] if config.tie_word_embeddings else hf["lm_head.weight"]
    yield {"embed": hf["model.embed_tokens.weight"], "lm_head": folded((head,), hf["model.norm.weight"])}
    del head
    for i in range(config.num_layers):
        hf_layer, layer = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = hf_layer + "self_attn.", hf_layer + "mlp."
        attn_gain, mlp_gain = hf[hf_layer + "input_layernorm.weight"], hf[hf_layer + "post_attention_layernorm.weight"]
        state: dict[str, Tensor | StoredMatrix] = {
            layer + "wqkv": folded(tuple(hf[attn + f"{p}_proj.weight"] for p in "qkv"), attn_gain),
            layer + "wo": StoredMatrix((hf[attn + "o_proj.weight"],)),
            layer + "w_gate_up": folded((hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]), mlp_gain),
            layer + "w_down": StoredMatrix((hf[mlp + "down_proj.weight"],)),
        }
        if config.qkv_bias:
            state[layer + "bqkv"] = torch.cat([hf[attn + f"{p}_proj.bias"] for p in "qkv"])
        if config.o_bias:
            state[layer + "bo"] = hf[attn + "o_proj.bias"]
        if config.mlp_bias:
            state[layer + "b_gate_up"] = torch.cat([hf[mlp + "gate_proj.bias"], hf[mlp + "up_proj.bias"]])
            state[layer + "b_down"] = hf[mlp + "down_proj.bias"]
        yield state


def hf_weight_names(config: ModelConfig) -> list[str]:
    """Every Hugging Face tensor name `prepared_weights` reads."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        names += [layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight"]
        names += [f"{layer}self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        if config.qkv_bias:
            names += [f"{layer}self_attn.{p}_proj.bias" for p in "qkv"]
        if config.o_bias:
            names.append(f"{layer}self_attn.o_proj.bias")
        if config.mlp_bias:
            names += [f"{layer}mlp.{p}_proj.bias" for p in ("gate", "up", "down")]
    return names


def normalize(x: Tensor, eps_times_dim: Tensor) -> Tensor:
    # RMSNorm without its gain and without the 1/sqrt(d) (both folded into the next matrix).
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps_times_dim)


PromptRows = tuple[tuple[int, int], ...]  # (first, end) row ranges of a batch that are prompt chunks


def project(x: Tensor, weight, bias: Tensor | None, gemm_rows: RowRange | None,
            prompt_rows: PromptRows = ()) -> Tensor:
    # x: [R, in] @ weight [in, out]. A weight that is not a tensor is a backend's packed matrix (it holds its
    # bias); `prompt_rows` lets it pick its prefill kernel for them (see workers.backends.cpu_fp16). On a
    # CPU every call is made at a row count measured to give each row the same bits (`gemm_rows`, cpu_rows).
    if not isinstance(weight, Tensor):
        return weight(x, prompt_rows)
    if gemm_rows is not None:
        return padded_matmul(x, weight, bias, gemm_rows)
    return matmul(x, weight, bias)


def _weight(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape), requires_grad=False)


@dataclass
class BatchLayout:
    """Where each segment's rows lie in a batched pass, worked out once for all layers."""

    ranges: list[tuple[int, int]]  # per segment, its rows [first, end) of the batch
    masks: list[Tensor | None]  # per segment, [group*T, write_at+T] (None: one decode row, no mask)
    slots: Tensor | None  # [R] each row's slot, for one indexed cache write (None: a single segment)
    indices: Tensor | None  # [R] each row's cache index
    prompt_rows: PromptRows
    gemm_rows: RowRange | None  # the row counts a CPU GEMM is called with (None: any, as on CUDA)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.group = config.num_heads // config.num_kv_heads
        self.q_width, self.kv_width, self.ffn_width = config.num_heads * hd, config.num_kv_heads * hd, f
        self.eps_times_dim = torch.tensor(0.0)  # set by Transformer.setup_caches on the real device
        self.wqkv = _weight(d, self.q_width + 2 * self.kv_width)
        self.wo = _weight(self.q_width, d)
        self.w_gate_up = _weight(d, 2 * f)
        self.w_down = _weight(f, d)
        self.bqkv = _weight(self.q_width + 2 * self.kv_width) if config.qkv_bias else None
        self.bo = _weight(d) if config.o_bias else None
        self.b_gate_up = _weight(2 * f) if config.mlp_bias else None
        self.b_down = _weight(d) if config.mlp_bias else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                segments: list[Segment], layout: BatchLayout) -> Tensor:
        # x: [R, d], the rows of every segment; cos, sin: [R, 1, hd]; k_cache, v_cache: [slots, kv_heads, max_seq_len, hd]
        R, hd, n_kv = x.shape[0], self.head_dim, self.n_kv_heads
        qkv = project(normalize(x, self.eps_times_dim), self.wqkv, self.bqkv, layout.gemm_rows, layout.prompt_rows)
        qk = qkv[:, : self.q_width + self.kv_width].view(R, self.n_heads + n_kv, hd)
        # RoPE on queries and keys at once; rotate_half(x) = x[..., halves swapped] * [-1.., +1..] (in sin)
        qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin)
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        v = qkv[:, self.q_width + self.kv_width :].view(R, n_kv, hd)

        if layout.slots is None:  # one segment: a slice of its slot
            segment = segments[0]
            end = segment.write_at + R
            k_cache[segment.slot, :, segment.write_at : end] = k.transpose(0, 1)
            v_cache[segment.slot, :, segment.write_at : end] = v.transpose(0, 1)
        else:  # every row to its own slot and index, in one indexed write
            k_cache[layout.slots, :, layout.indices] = k
            v_cache[layout.slots, :, layout.indices] = v

        outputs = []
        for segment, (first, last), mask in zip(segments, layout.ranges, layout.masks):
            outputs.append(self._attend(q[first:last], k_cache[segment.slot], v_cache[segment.slot],
                                        segment.write_at + last - first, mask))
        attn = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        x = x + project(attn, self.wo, self.bo, layout.gemm_rows, layout.prompt_rows)

        gate_up = project(normalize(x, self.eps_times_dim), self.w_gate_up, self.b_gate_up, layout.gemm_rows,
                          layout.prompt_rows)
        hidden = F.silu(gate_up[:, : self.ffn_width]) * gate_up[:, self.ffn_width :]
        return x + project(hidden, self.w_down, self.b_down, layout.gemm_rows, layout.prompt_rows)

    def _attend(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, end: int, mask: Tensor | None) -> Tensor:
        # One segment's queries q [T, heads, hd] against its slot's cache [kv_heads, max_seq_len, hd] up to `end`.
        # Grouped-query attention without repeating K/V: each KV head serves its group's query heads
        # as group*T query rows. Head h belongs to KV head h // group.
        T, hd, n_kv = q.shape[0], self.head_dim, self.n_kv_heads
        if mask is None:  # one decode row
            q = q.reshape(1, n_kv, self.group, hd)
        else:
            q = q.reshape(T, n_kv, self.group, hd).permute(1, 2, 0, 3).reshape(1, n_kv, self.group * T, hd)
        attn = F.scaled_dot_product_attention(q, k_cache[None, :, :end], v_cache[None, :, :end], attn_mask=mask)
        if mask is None:
            return attn.reshape(1, self.q_width)  # a view on CPU; CUDA kernels may return another layout
        return attn.view(n_kv, self.group, T, hd).permute(2, 0, 1, 3).reshape(T, self.q_width)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = _weight(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.lm_head = _weight(config.hidden_size, config.vocab_size)
        self.eps_times_dim = torch.tensor(0.0)
        self.max_seq_len = 0
        self.gemm_rows: RowRange | None = None  # set by the runner on a CPU (workers.backends.cpu_rows)
        self.native: cpu_native.NativeModel | None = None  # fp16 weights on a CPU: every pass in one C call
        self.native_missing = ""  # why fp16 weights run without it, where they do

    def setup_caches(self, n_slots: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocates the KV cache [layers, slots, kv_heads, max_seq_len, hd], RoPE tables and causal mask."""
        config = self.config
        shape = (config.num_layers, n_slots, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len
        # A 0-d tensor, because adding a Python float re-wraps it as a tensor on every call.
        self.eps_times_dim = torch.tensor(config.rms_norm_eps * config.hidden_size, dtype=dtype, device=device)
        for layer in self.layers:
            layer.eps_times_dim = self.eps_times_dim

        inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [max_seq_len, hd/2]
        self.cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(device, dtype)
        self.sin = torch.cat((-angles.sin(), angles.sin()), dim=-1).to(device, dtype)  # signs of rotate_half
        # causal[i, j]: position i may attend to position j
        self.causal = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device).tril()

    def attach_native_decoder(self) -> None:
        """With every matrix packed in fp16 (cpu_fp16), runs every pass through specpipe's CPU kernels: one C
        call for the whole pass (workers.backends.cpu_native)."""
        kernels = cpu_native.load()
        if not isinstance(kernels, cpu_native.Kernels):
            self.native_missing = kernels
            return
        config = self.config
        misfit = cpu_native.fits(kernels, config.hidden_size, config.head_dim, config.intermediate_size)
        if misfit:
            self.native_missing = misfit
            return
        packed = [getattr(module, name) for module, name, _ in self.matrices()]
        if not all(isinstance(matrix, PackedFp16) and matrix.native is not None for matrix in packed):
            self.native_missing = "weights not packed for the kernels"
            return
        layers = [(layer.wqkv.native, layer.wo.native, layer.w_gate_up.native, layer.w_down.native,
                   self.k_cache[i], self.v_cache[i]) for i, layer in enumerate(self.layers)]
        self.native = cpu_native.NativeModel(
            kernels, hidden=config.hidden_size, heads=config.num_heads, kv_heads=config.num_kv_heads,
            head_dim=config.head_dim, ffn=config.intermediate_size, vocab=config.vocab_size,
            max_seq=self.max_seq_len, eps_times_dim=float(self.eps_times_dim), embed=self.embed.data,
            cos=self.cos, sin=self.sin, layers=layers, head=self.lm_head.native)

    def numerics(self) -> str:
        """How this model's rows are computed, for the worker's startup line."""
        if self.native is not None:
            return self.native.kernels.describe()
        if self.native_missing:
            products = getattr(self.lm_head, "native", None)  # a PackedFp16 packs for the kernels whenever they load
            if products is not None:
                return f"{products.kernels.describe()} for the products, torch for the rest ({self.native_missing})"
            return f"fbgemm fp16 (no specpipe CPU kernels: {self.native_missing})"
        return "" if self.gemm_rows is None else self.gemm_rows.describe()

    def forward(self, segments: list[Segment]) -> list[Tensor]:
        """Logits [segment.logits, vocab] per segment (the rows of its final positions), all in one pass: one call
        of the CPU kernels where the model has them (prompt chunks included: their rows are computed as any
        other, so a prompt reads the same in every engine that computes in fp32), else the torch path below."""
        if self.native is not None:
            return self._forward_native(segments)
        return self._forward(segments)

    def _forward_native(self, segments: list[Segment]) -> list[Tensor]:
        # Per row five ints (cpu_native.ROW_FIELDS): token, slot, rotary position, cache index, and the end of the
        # keys it sees (all below it, or those its mask row shows, for scratch rows).
        fields, masks, logit_rows, first = array.array("i"), None, array.array("i"), 0
        for segment in segments:
            T, start, slot = segment.rows, segment.write_at, segment.slot
            tokens = segment.tokens.tolist()
            if segment.mask is None:  # appended rows: each sees the cache up to itself
                for i, token in enumerate(tokens):
                    fields.extend((token, slot, start + i, start + i, start + i + 1))
                if masks is not None:
                    masks += [0] * T
            else:  # scratch rows: mask [T, start + T] (bool, contiguous: checked), row i sees j where mask[i, j]
                address, width = segment.mask.data_ptr(), start + T
                for i, (token, position) in enumerate(zip(tokens, segment.positions.tolist())):
                    fields.extend((token, slot, position, start + i, width))
                masks = ([0] * first if masks is None else masks) + [address + i * width for i in range(T)]
            logit_rows.extend(range(first + T - segment.logits, first + T))
            first += T
        logits = self.native.forward(fields, masks, logit_rows)
        if len(segments) == 1:
            return [logits]
        out, taken = [], 0
        for segment in segments:
            out.append(logits[taken : taken + segment.logits])
            taken += segment.logits
        return out

    def _forward(self, segments: list[Segment]) -> list[Tensor]:
        x, cos, sin = self._embed(segments)
        layout = self._layout(segments)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, self.k_cache[i], self.v_cache[i], segments, layout)
        # Only the rows whose logits are wanted reach the LM head: it is a large share of a prefill's FLOPs.
        wanted = [(last - s.logits, last) for s, (_, last) in zip(segments, layout.ranges) if s.logits]
        if not wanted:
            return [x.new_empty(0, self.config.vocab_size) for _ in segments]
        if len(segments) == 1:
            rows = x[wanted[0][0] :]
        else:
            rows = torch.cat([x[first:last] for first, last in wanted])
        logits = project(normalize(rows, self.eps_times_dim), self.lm_head, None, self.gemm_rows)
        out, taken = [], 0
        for segment in segments:
            out.append(logits[taken : taken + segment.logits])
            taken += segment.logits
        return out

    def _embed(self, segments: list[Segment]) -> tuple[Tensor, Tensor, Tensor]:
        # The tokens' embeddings [R, d] and their rotations cos, sin [R, 1, hd].
        if len(segments) == 1 and segments[0].positions is None:
            segment = segments[0]
            start, end = segment.write_at, segment.write_at + segment.rows
            return F.embedding(segment.tokens, self.embed), self.cos[start:end, None], self.sin[start:end, None]
        tokens = torch.cat([s.tokens for s in segments])
        positions = torch.cat([s.positions if s.positions is not None
                               else torch.arange(s.write_at, s.write_at + s.rows, device=tokens.device)
                               for s in segments])
        return F.embedding(tokens, self.embed), self.cos[positions, None], self.sin[positions, None]

    def _layout(self, segments: list[Segment]) -> BatchLayout:
        group = self.config.num_heads // self.config.num_kv_heads
        ranges, masks, prompt_rows, first = [], [], [], 0
        for segment in segments:
            T, start = segment.rows, segment.write_at
            ranges.append((first, first + T))
            if segment.prompt_pass:
                prompt_rows.append((first, first + T))
            mask = segment.mask
            if mask is None and T > 1:
                mask = self.causal[start : start + T, : start + T]
            masks.append(None if mask is None else mask.repeat(group, 1))  # [group*T, end]: row g*T + t is query t
            first += T
        if len(segments) == 1:
            return BatchLayout(ranges, masks, None, None, tuple(prompt_rows), self.gemm_rows)
        device = self.k_cache.device
        slots = torch.cat([torch.full((s.rows,), s.slot, dtype=torch.long) for s in segments]).to(device)
        indices = torch.cat([torch.arange(s.write_at, s.write_at + s.rows) for s in segments]).to(device)
        return BatchLayout(ranges, masks, slots, indices, tuple(prompt_rows), self.gemm_rows)

    def matrices(self) -> Iterator[tuple[nn.Module, str, str | None]]:
        """Every matrix a backend may repack (all but the embedding), as (module, weight name, bias name)."""
        for layer in self.layers:
            yield from ((layer, "wqkv", "bqkv"), (layer, "wo", "bo"), (layer, "w_gate_up", "b_gate_up"),
                        (layer, "w_down", "b_down"))
        yield self, "lm_head", None
