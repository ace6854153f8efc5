"""A torch-backed stand-in for exactly the ttnn calls specpipe's ttnn backend makes.

Each function keeps ttnn's own parameter names (and positions) for the parameters we pass, and takes
no others, so the runner cannot pass what the stand-in does not know; tests/workers/backends/
test_ttnn_api.py checks every name in `API` and `CONSTANTS` against the installed ttnn. Semantics
follow ttnn's golden functions where it has them. Numerics: values are stored rounded to their
dtype (bfloat16; bfloat8_b as blocks of 16 sharing an exponent, 7-bit mantissas) and computed in
float32, as the chip accumulates with fp32_dest_acc_en. A mesh tensor is one torch tensor per chip.

What real ttnn enforces and the stand-in checks too: tile-aligned fill_cache, no host transfers
during trace capture, no use of a deallocated tensor, a mapper for every tensor put on a mesh.
During capture ops run (to give shapes) but the KV writes are only recorded, so a runner that
read a capture's output without replaying it would see stale keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F

API: dict[str, Callable[..., Any]] = {}  # ttnn name -> stand-in function (first parameter: the stand-in)
CONSTANTS = ["bfloat16", "bfloat8_b", "uint32", "TILE_LAYOUT", "ROW_MAJOR_LAYOUT", "DRAM_MEMORY_CONFIG",
             "MathFidelity.HiFi4", "FabricConfig.FABRIC_1D", "FabricConfig.DISABLED"]
METHODS = {"MeshDevice": ["compute_with_storage_grid_size"]}  # methods we call on ttnn objects
TILE = 32


def api(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        API[name] = fn
        return fn

    return register


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def round_bfp8(x: torch.Tensor) -> torch.Tensor:
    """bfloat8_b: each 16 consecutive values of a row share one exponent; 7 mantissa bits and a sign each."""
    groups = x.float().reshape(-1, 16)
    exponent = torch.floor(torch.log2(groups.abs().amax(dim=1, keepdim=True).clamp(min=2.0**-126)))
    step = torch.pow(2.0, exponent - 6)
    return (torch.round(groups / step).clamp(-127, 127) * step).reshape(x.shape)


ROUND = {"bfloat16": round_bf16, "bfloat8_b": round_bfp8, "uint32": lambda x: x.long()}


@dataclass
class Device:
    n_devices: int = 1
    grid: tuple[int, int] = (8, 8)
    closed: bool = False

    def compute_with_storage_grid_size(self) -> tuple[int, int]:
        return self.grid


class Tensor:
    def __init__(self, shards: list[torch.Tensor], dtype: str, layout: str, device: Device | None) -> None:
        self.shards, self.dtype, self.layout, self.device = shards, dtype, layout, device
        self.freed = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.shards[0].shape)

    def live(self) -> list[torch.Tensor]:
        if self.freed:
            raise RuntimeError("use of a deallocated tensor")
        return self.shards


@dataclass(frozen=True)
class Mapper:
    kind: str  # "replicate" | "shard" | "concat"
    dim: int = 0


class Standin:
    """`ttnn` for the runner: pass an instance where the runner takes the module."""

    bfloat16, bfloat8_b, uint32 = "bfloat16", "bfloat8_b", "uint32"
    TILE_LAYOUT, ROW_MAJOR_LAYOUT = "TILE", "ROW_MAJOR"
    DRAM_MEMORY_CONFIG = "DRAM"
    MathFidelity = SimpleNamespace(HiFi4="HiFi4")
    FabricConfig = SimpleNamespace(FABRIC_1D="FABRIC_1D", DISABLED="DISABLED")

    def __init__(self, chips: int = 1, pcie_chips: int = 1) -> None:
        self.chips, self.pcie_chips = chips, pcie_chips
        self.fabric = "DISABLED"
        self.recording: list[tuple[Callable[..., Any], tuple, dict, Any]] | None = None
        self.replaying = False
        self.next_trace_id = 0
        self.traces: dict[int, list] = {}
        self.calls: dict[str, int] = {}
        for namespace in ("experimental", "transformer"):
            setattr(self, namespace, SimpleNamespace())
        for name, fn in API.items():
            bound = self._wrap(name, fn)
            if "." in name:
                setattr(getattr(self, name.split(".")[0]), name.split(".")[1], bound)
            else:
                setattr(self, name, bound)

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            out = fn(self, *args, **kwargs)
            if self.recording is not None and name in TRACEABLE:
                self.recording.append((fn, args, kwargs, out))
            return out

        return call

    def _on_device(self, *tensors: Tensor) -> list[list[torch.Tensor]]:
        for tensor in tensors:
            if tensor.device is None:
                raise RuntimeError("this op needs its inputs on the device")
        return [tensor.live() for tensor in tensors]

    def _result(self, shards: list[torch.Tensor], like: Tensor, dtype: str = "bfloat16") -> Tensor:
        return Tensor([ROUND[dtype](s) for s in shards], dtype, "TILE", like.device)


def _map(fn: Callable[..., torch.Tensor], *shard_lists: list[torch.Tensor]) -> list[torch.Tensor]:
    return [fn(*shards) for shards in zip(*shard_lists)]


# --- devices -------------------------------------------------------------------------------------

@api("GetNumAvailableDevices")
def get_num_available_devices(t: Standin) -> int:
    if t.chips == 0:
        raise RuntimeError("TT_FATAL @ tt_cluster.cpp:129: num_chips > 0\ninfo:\nNo chips detected in the cluster")
    return t.chips


@api("GetNumPCIeDevices")
def get_num_pcie_devices(t: Standin) -> int:
    return t.pcie_chips


@api("open_device")
def open_device(t: Standin, *, device_id: int, l1_small_size: int, trace_region_size: int) -> Device:
    if device_id >= t.chips:
        raise RuntimeError(f"TT_FATAL\ninfo:\nDevice {device_id} is not available")
    return Device(1)


@api("set_fabric_config")
def set_fabric_config(t: Standin, config: str) -> None:
    t.fabric = config


@api("open_mesh_device")
def open_mesh_device(t: Standin, mesh_shape: tuple[int, int], *, l1_small_size: int, trace_region_size: int) -> Device:
    if mesh_shape[0] * mesh_shape[1] > 1 and t.fabric == "DISABLED":
        raise RuntimeError("TT_FATAL\ninfo:\nCCL ops need a fabric: call set_fabric_config before open_mesh_device")
    return Device(mesh_shape[0] * mesh_shape[1])


@api("MeshShape")
def mesh_shape(t: Standin, s0: int, s1: int) -> tuple[int, int]:
    return (s0, s1)


@api("close_device")
def close_device(t: Standin, device: Device) -> None:
    device.closed = True


@api("close_mesh_device")
def close_mesh_device(t: Standin, mesh_device: Device) -> None:
    mesh_device.closed = True


@api("WormholeComputeKernelConfig")
def compute_kernel_config(t: Standin, *, math_fidelity: str, math_approx_mode: bool, fp32_dest_acc_en: bool,
                          packer_l1_acc: bool) -> SimpleNamespace:
    return SimpleNamespace(math_fidelity=math_fidelity, fp32_dest_acc_en=fp32_dest_acc_en)


@api("SDPAProgramConfig")
def sdpa_program_config(t: Standin, *, compute_with_storage_grid_size: tuple[int, int], q_chunk_size: int,
                        k_chunk_size: int, exp_approx_mode: bool) -> SimpleNamespace:
    return SimpleNamespace(q_chunk_size=q_chunk_size, k_chunk_size=k_chunk_size)


@api("ReplicateTensorToMesh")
def replicate_to_mesh(t: Standin, mesh_device: Device) -> Mapper:
    return Mapper("replicate")


@api("ShardTensorToMesh")
def shard_to_mesh(t: Standin, mesh_device: Device, dim: int) -> Mapper:
    return Mapper("shard", dim)


@api("ConcatMeshToTensor")
def concat_mesh(t: Standin, mesh_device: Device, dim: int) -> Mapper:
    return Mapper("concat", dim)


# --- moving tensors ------------------------------------------------------------------------------

@api("from_torch")
def from_torch(t: Standin, tensor: torch.Tensor, dtype: str | None = None, *, layout: str | None = None,
               device: Device | None = None, memory_config: str | None = None, mesh_mapper: Mapper | None = None) -> Tensor:
    if device is not None and t.recording is not None:
        raise RuntimeError("writes to the device are not allowed during trace capture")
    dtype = dtype or "bfloat16"
    if mesh_mapper is None:
        if device is not None and device.n_devices > 1:
            raise RuntimeError("a tensor for a mesh needs a mesh_mapper")
        shards = [tensor]
    elif mesh_mapper.kind == "replicate":
        shards = [tensor] * (device.n_devices if device is not None else 1)
    else:
        n = device.n_devices if device is not None else 1
        if tensor.shape[mesh_mapper.dim] % n:
            raise RuntimeError(f"dim {mesh_mapper.dim} of {tuple(tensor.shape)} does not split over {n} devices")
        shards = list(torch.chunk(tensor, n, dim=mesh_mapper.dim))
    return Tensor([ROUND[dtype](s.clone()) for s in shards], dtype, layout or "ROW_MAJOR", device)


@api("to_torch")
def to_torch(t: Standin, tensor: Tensor, *, mesh_composer: Mapper | None = None) -> torch.Tensor:
    if t.recording is not None:
        raise RuntimeError("reads from the device are not allowed during trace capture")
    shards = tensor.live()
    if len(shards) > 1 and mesh_composer is None:
        raise RuntimeError("a mesh tensor needs a mesh_composer")
    out = shards[0] if mesh_composer is None else torch.cat(shards, dim=mesh_composer.dim)
    return out.to(torch.bfloat16) if tensor.dtype == "bfloat16" else out.clone()


@api("copy_host_to_device_tensor")
def copy_host_to_device_tensor(t: Standin, host_tensor: Tensor, device_tensor: Tensor) -> None:
    if t.recording is not None:
        raise RuntimeError("writes to the device are not allowed during trace capture")
    if host_tensor.device is not None or device_tensor.device is None:
        raise RuntimeError("copy_host_to_device_tensor copies a host tensor into a device tensor")
    if host_tensor.shape != device_tensor.shape or host_tensor.dtype != device_tensor.dtype:
        raise RuntimeError(f"shape/dtype mismatch: {host_tensor.shape} {host_tensor.dtype} into "
                           f"{device_tensor.shape} {device_tensor.dtype}")
    targets = device_tensor.live()
    sources = host_tensor.shards * (len(targets) if len(host_tensor.shards) == 1 else 1)
    for target, source in zip(targets, sources):
        target.copy_(source)


@api("deallocate")
def deallocate(t: Standin, tensor: Tensor) -> None:
    tensor.freed = True


# --- ops (TRACEABLE: recorded during capture and rerun by execute_trace) -------------------------

@api("embedding")
def embedding(t: Standin, input_tensor: Tensor, weight: Tensor, *, layout: str | None = None) -> Tensor:
    ids, table = t._on_device(input_tensor, weight)
    return t._result(_map(lambda i, w: F.embedding(i.long(), w.reshape(-1, w.shape[-1])), ids, table), weight)


@api("reshape")
def reshape(t: Standin, input_tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    (x,) = t._on_device(input_tensor)
    return Tensor([s.reshape(shape) for s in x], input_tensor.dtype, input_tensor.layout, input_tensor.device)


@api("rms_norm")
def rms_norm(t: Standin, input_tensor: Tensor, *, epsilon: float, weight: Tensor,
             compute_kernel_config: Any = None) -> Tensor:
    x, g = t._on_device(input_tensor, weight)
    return t._result(_map(lambda a, w: a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + epsilon) * w.reshape(-1),
                          x, g), input_tensor)


@api("linear")
def linear(t: Standin, input_tensor_a: Tensor, input_tensor_b: Tensor, *, bias: Tensor | None = None,
           compute_kernel_config: Any = None) -> Tensor:
    a, b = t._on_device(input_tensor_a, input_tensor_b)
    if a[0].shape[-1] != b[0].shape[-2]:
        raise RuntimeError(f"linear: {tuple(a[0].shape)} @ {tuple(b[0].shape)}")
    out = _map(torch.matmul, a, b)
    if bias is not None:
        out = _map(torch.add, out, t._on_device(bias)[0])
    return t._result(out, input_tensor_a)


@api("experimental.nlp_create_qkv_heads")
def nlp_create_qkv_heads(t: Standin, input: Tensor, *, num_heads: int, num_kv_heads: int,
                         transpose_k_heads: bool) -> tuple[Tensor, Tensor, Tensor]:
    (x,) = t._on_device(input)  # [B, 1, S, (heads + 2 kv_heads) * hd]
    batch, one, seq, width = x[0].shape
    if one != 1 or seq % TILE:
        raise RuntimeError(f"nlp_create_qkv_heads: input must be [B, 1, S, W] with S in whole tiles, got {x[0].shape}")
    hd = width // (num_heads + 2 * num_kv_heads)

    def heads(a: torch.Tensor, first: int, count: int) -> torch.Tensor:
        return a[..., first * hd : (first + count) * hd].reshape(batch, seq, count, hd).transpose(1, 2).contiguous()

    q = _map(lambda a: heads(a, 0, num_heads), x)
    k = _map(lambda a: heads(a, num_heads, num_kv_heads), x)
    v = _map(lambda a: heads(a, num_heads + num_kv_heads, num_kv_heads), x)
    if transpose_k_heads:
        k = _map(lambda a: a.transpose(-1, -2), k)
    return t._result(q, input), t._result(k, input), t._result(v, input)


@api("experimental.rotary_embedding")
def rotary_embedding(t: Standin, input_tensor: Tensor, cos_cache: Tensor, sin_cache: Tensor) -> Tensor:
    x, cos, sin = t._on_device(input_tensor, cos_cache, sin_cache)
    width = x[0].shape[-1]
    if width % (2 * TILE) or cos[0].shape[:2] != (1, 1) or cos[0].shape[-1] != width or cos[0].shape != sin[0].shape:
        raise RuntimeError("rotary_embedding: head_dim must be a multiple of 64 and cos/sin [1, 1, S, head_dim]")

    def rotate(a: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        seq, half = a.shape[-2], a.shape[-1] // 2
        if c.shape[-2] < seq:
            raise RuntimeError("rotary_embedding: cos/sin cache shorter than the input")
        rotated = torch.cat((-a[..., half:], a[..., :half]), dim=-1)
        return a * c[..., :seq, :] + rotated * s[..., :seq, :]

    return t._result(_map(rotate, x, cos, sin), input_tensor)


@api("fill_cache")
def fill_cache(t: Standin, cache_tensor: Tensor, input_tensor: Tensor, batch_idx: int, *, update_idx: int = 0) -> Tensor:
    cache, x = t._on_device(cache_tensor, input_tensor)
    seq = x[0].shape[-2]
    if update_idx % TILE or seq % TILE:
        raise RuntimeError(f"fill_cache: update_idx {update_idx} and length {seq} must be multiples of {TILE}")
    if update_idx + seq > cache[0].shape[-2]:
        raise RuntimeError("fill_cache: writes past the end of the cache")
    if t.recording is None or t.replaying:
        for c, a in zip(cache, x):
            c[batch_idx : batch_idx + 1, :, update_idx : update_idx + seq, :] = a
    return cache_tensor


@api("transformer.scaled_dot_product_attention")
def scaled_dot_product_attention(t: Standin, input_tensor_q: Tensor, input_tensor_k: Tensor, input_tensor_v: Tensor,
                                 *, attn_mask: Tensor | None = None, is_causal: bool = True, scale: float | None = None,
                                 program_config: Any = None, compute_kernel_config: Any = None) -> Tensor:
    if attn_mask is not None and is_causal:
        raise RuntimeError("scaled_dot_product_attention: attn_mask needs is_causal=False")
    q, k, v = t._on_device(input_tensor_q, input_tensor_k, input_tensor_v)
    mask = t._on_device(attn_mask)[0] if attn_mask is not None else [None] * len(q)
    if program_config is not None and k[0].shape[-2] % (program_config.k_chunk_size):
        raise RuntimeError("scaled_dot_product_attention: key length must be a multiple of k_chunk_size")

    def attend(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        group = qs.shape[1] // ks.shape[1]
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        scores = qs @ ks.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(qs.shape[-1]))
        if m is not None:
            scores = scores + m
        return torch.softmax(scores, dim=-1) @ vs

    return t._result(_map(attend, q, k, v, mask), input_tensor_q)


@api("experimental.nlp_concat_heads")
def nlp_concat_heads(t: Standin, input_tensor: Tensor) -> Tensor:
    (x,) = t._on_device(input_tensor)  # [B, H, S, hd] -> [B, 1, S, H * hd]
    return t._result(_map(lambda a: a.transpose(1, 2).reshape(a.shape[0], 1, a.shape[2], -1), x), input_tensor)


@api("add")
def add(t: Standin, input_tensor_a: Tensor, input_tensor_b: Tensor) -> Tensor:
    return t._result(_map(torch.add, *t._on_device(input_tensor_a, input_tensor_b)), input_tensor_a)


@api("mul")
def mul(t: Standin, input_tensor_a: Tensor, input_tensor_b: Tensor) -> Tensor:
    return t._result(_map(torch.mul, *t._on_device(input_tensor_a, input_tensor_b)), input_tensor_a)


@api("silu")
def silu(t: Standin, input_tensor: Tensor) -> Tensor:
    return t._result(_map(F.silu, *t._on_device(input_tensor)), input_tensor)


@api("all_reduce")
def all_reduce(t: Standin, input_tensor: Tensor) -> Tensor:
    (x,) = t._on_device(input_tensor)
    total = torch.stack(x).sum(0)
    return t._result([total.clone() for _ in x], input_tensor)


TRACEABLE = {"embedding", "reshape", "rms_norm", "linear", "experimental.nlp_create_qkv_heads",
             "experimental.rotary_embedding", "fill_cache", "transformer.scaled_dot_product_attention",
             "experimental.nlp_concat_heads", "add", "mul", "silu", "all_reduce"}


# --- traces --------------------------------------------------------------------------------------

@api("begin_trace_capture")
def begin_trace_capture(t: Standin, mesh_device: Device, *, cq_id: int | None = None) -> int:
    if t.recording is not None:
        raise RuntimeError("a trace capture is already running")
    t.recording = []
    t.next_trace_id += 1
    return t.next_trace_id


@api("end_trace_capture")
def end_trace_capture(t: Standin, mesh_device: Device, trace_id: int, *, cq_id: int | None = None) -> None:
    t.traces[trace_id], t.recording = t.recording, None


@api("execute_trace")
def execute_trace(t: Standin, mesh_device: Device, trace_id: int, *, cq_id: int | None = None,
                  blocking: bool = True) -> None:
    """Reruns the recorded ops on the same tensors, writing each result into the recorded output's memory."""
    t.replaying = True
    try:
        for fn, args, kwargs, out in t.traces[trace_id]:
            fresh = fn(t, *args, **kwargs)
            for target, source in zip(out if isinstance(out, tuple) else (out,),
                                      fresh if isinstance(fresh, tuple) else (fresh,)):
                if target is not source:
                    for a, b in zip(target.live(), source.shards):
                        a.copy_(b)
    finally:
        t.replaying = False


@api("release_trace")
def release_trace(t: Standin, mesh_device: Device, trace_id: int) -> None:
    del t.traces[trace_id]

