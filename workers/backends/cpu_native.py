"""specpipe's CPU kernels (cpu_kernels.c): built at first use, loaded with ctypes.

`--dtype fp16-weights` runs every pass (prompt chunks, decode steps, verification windows, drafted
branches) through one C call, `sp_forward`, where the model's widths fit the kernels' vectors; where
they do not, each matrix product is still one C call (`sp_matmul`) and torch does the rest. The library
is compiled with the machine's C compiler (`$CC`, else `cc`) and -march=native into the cache directory
($SPECPIPE_CACHE, else $XDG_CACHE_HOME/specpipe or ~/.cache/specpipe), keyed by the source, the
compiler and the CPU's flags; where it cannot be built or loaded (or SPECPIPE_CPU_KERNELS=torch),
fp16-weights falls back to fbgemm (and says why in the worker's startup line).

The ctypes structures below copy the C structs by hand: `load_library` checks their sizes and fields
against the table the library exports (`sp_struct_layout`) and refuses a library that differs.

A row's result never depends on what shares its pass (see the C file), so no row-count probing is
needed here as it is for BLAS (cpu_rows).
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from workers.backends.cpu_features import cpu_flags_key

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O2", "-march=native", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-fno-fast-math",
         "-ffp-contract=off", "-fno-math-errno")
DISABLE = "SPECPIPE_CPU_KERNELS"  # =torch: use fbgemm for fp16-weights even where the kernels build


class Matrix(ctypes.Structure):
    _fields_ = [("panels", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("in_features", ctypes.c_int32),
                ("out_features", ctypes.c_int32)]


class Layer(ctypes.Structure):
    _fields_ = [("qkv", Matrix), ("o", Matrix), ("gate_up", Matrix), ("down", Matrix),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in
                ("n_layers", "d", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "max_seq")] + [
        ("eps_times_dim", ctypes.c_float), ("attn_scale", ctypes.c_float), ("embed", ctypes.c_void_p),
        ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("layers", ctypes.POINTER(Layer)), ("head", Matrix)]


# The C structs the ctypes structures above copy, and the C names of fields that the copies name otherwise.
STRUCTS: dict[str, type[ctypes.Structure]] = {"sp_matrix": Matrix, "sp_layer": Layer, "sp_model": Model}
C_FIELD_NAMES = {("sp_matrix", "in_features"): "in", ("sp_matrix", "out_features"): "out"}


class LayoutMismatch(RuntimeError):
    """The library's structs differ from their ctypes copies here: a bug in cpu_native.py or cpu_kernels.c."""


class _LayoutEntry(ctypes.Structure):  # cpu_kernels.c's sp_layout_entry
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_int64)]


# sp_pack_parts' codes for the dtypes a checkpoint stores matrices in
SOURCE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

ROW_FIELDS = 5  # per row of a pass, int32: token, slot, rotary position, cache index, end of the keys it sees


@dataclass(frozen=True)
class Kernels:
    """The loaded library and what it was built for."""

    lib: ctypes.CDLL
    path: Path
    vector_width: int  # floats per SIMD vector: 16 (AVX-512), 8 (AVX2), 1 (plain C)
    panel_width: int

    def describe(self) -> str:
        isa = {16: "AVX-512", 8: "AVX2"}.get(self.vector_width, "plain C")
        threads = self.lib.sp_threads()
        return f"specpipe CPU kernels ({isa}, {threads} thread{'s' if threads > 1 else ''})"


def cache_dir() -> Path:
    root = os.environ.get("SPECPIPE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specpipe"
    return Path(root)


def _compiler() -> str | None:
    name = os.environ.get("CC", "cc")
    return shutil.which(name) or shutil.which("gcc") or shutil.which("clang")


def build(directory: Path | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles the kernels (once per source, compiler, flags and CPU) and returns the library's path; raises
    RuntimeError saying why when it cannot. `extra_flags` (e.g. -mno-avx512f) are for tests of other paths."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (set CC, or install gcc)")
    flags = (*FLAGS, *extra_flags)
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                     cpu_flags_key().encode()])).hexdigest()[:16]
    directory = (directory or cache_dir() / "kernels") / key
    library = directory / "libspecpipe_cpu.so"
    if library.exists():
        return library
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.mkdtemp(prefix="specpipe-kernels-"))
        library = directory / "libspecpipe_cpu.so"
    partial = directory / f".build-{os.getpid()}.so"  # two workers may build at once: each renames its own
    done = subprocess.run([compiler, *flags, "-o", str(partial), str(SOURCE), "-lm"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(compiler).name} failed to build {SOURCE.name}: "
                           f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    os.replace(partial, library)
    return library


_threads = 1  # set_threads'


@functools.cache
def load() -> Kernels | str:
    """The kernels, or why there are none here (a line for the worker's startup message)."""
    if os.environ.get(DISABLE, "").lower() == "torch":
        return f"{DISABLE}=torch"
    try:
        kernels = load_library(build())
    except (RuntimeError, OSError) as error:
        return str(error)
    kernels.lib.sp_set_threads(_threads)
    return kernels


def set_threads(threads: int) -> None:
    """Every pass of the kernels in this process spreads over `threads` threads from now on (the caller and
    helpers that inherit its CPU affinity), from when they load if they have not yet. A row's result is the
    same at any count. Not to be called while a pass runs."""
    global _threads
    _threads = threads
    if load.cache_info().currsize:
        kernels = load()
        if isinstance(kernels, Kernels):
            kernels.lib.sp_set_threads(threads)


def struct_layout(lib: ctypes.CDLL) -> list[tuple[str, int]]:
    """The library's layout table: ("struct", its size) then ("struct.field", its offset) per field, in order."""
    entries = ctypes.POINTER(_LayoutEntry)()
    layout = lib.sp_struct_layout
    layout.argtypes = [ctypes.POINTER(ctypes.POINTER(_LayoutEntry))]
    layout.restype = ctypes.c_int
    count = layout(ctypes.byref(entries))
    return [(entries[i].name.decode(), entries[i].value) for i in range(count)]


def layout_mismatch(table: list[tuple[str, int]], structs: dict[str, type[ctypes.Structure]] | None = None) -> str:
    """'' if each ctypes structure has the size, field names (C_FIELD_NAMES aside) and field offsets, in order, of
    the C struct it copies in `table` (struct_layout's), else the first difference."""
    sizes = {name: value for name, value in table if "." not in name}
    fields: dict[str, list[tuple[str, int]]] = {}
    for name, value in table:
        if "." in name:
            struct_name, field = name.split(".", 1)
            fields.setdefault(struct_name, []).append((field, value))
    for c_struct, struct in (STRUCTS if structs is None else structs).items():
        ours = struct.__name__
        if c_struct not in sizes:
            return f"the library lists no struct {c_struct} (copied by {ours})"
        theirs = fields.get(c_struct, [])
        copies = [(name, C_FIELD_NAMES.get((c_struct, name), name), getattr(struct, name).offset)
                  for name, *_ in struct._fields_]
        for i, (c_field, c_offset) in enumerate(theirs):
            if i == len(copies):
                return f"{c_struct}.{c_field} (offset {c_offset}) has no field in {ours}"
            name, expected_c_name, offset = copies[i]
            if expected_c_name != c_field:
                return f"{c_struct}'s field {i} is {c_field}, but {ours}'s is {name}"
            if offset != c_offset:
                return f"{c_struct}.{c_field} is at offset {c_offset}, but {ours}.{name} at {offset}"
        if len(copies) > len(theirs):
            return f"{ours}.{copies[len(theirs)][0]} has no field in {c_struct}"
        if ctypes.sizeof(struct) != sizes[c_struct]:
            return f"sizeof({c_struct}) is {sizes[c_struct]} bytes, but {ours}'s {ctypes.sizeof(struct)}"
    return ""


def load_library(path: Path) -> Kernels:
    """The kernels of one built library (raises OSError if it does not load, LayoutMismatch if its structs are not
    the ctypes structures here)."""
    lib = ctypes.CDLL(str(path))
    try:
        mismatch = layout_mismatch(struct_layout(lib))
    except AttributeError:
        mismatch = "the library exports no sp_struct_layout (it was not built from this source)"
    if mismatch:
        raise LayoutMismatch(f"{SOURCE.name}'s structs differ from their ctypes copies in {Path(__file__).name} "
                             f"(a bug: make them match): {mismatch}")
    lib.sp_pack_parts.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_int, ctypes.c_void_p]
    lib.sp_pack_parts.restype = None
    lib.sp_matmul.argtypes = [ctypes.POINTER(Matrix), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.sp_scratch_floats.argtypes = [ctypes.POINTER(Model), ctypes.c_int]
    lib.sp_scratch_floats.restype = ctypes.c_size_t
    lib.sp_forward.argtypes = [ctypes.POINTER(Model), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                               ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.sp_products.argtypes = [ctypes.POINTER(Model), ctypes.c_void_p, ctypes.c_void_p]
    lib.sp_products.restype = None
    lib.sp_set_threads.argtypes = [ctypes.c_int]
    lib.sp_set_threads.restype = ctypes.c_int
    lib.sp_threads.restype = ctypes.c_int
    lib.sp_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.sp_read.restype = ctypes.c_float
    for name in ("sp_matmul", "sp_forward"):
        getattr(lib, name).restype = None
    return Kernels(lib, path, lib.sp_vector_width(), lib.sp_panel_width())


class PackedMatrix:
    """A [in, out] matrix in the kernels' fp16 panels, with its bias: y = x @ W + b."""

    def __init__(self, kernels: Kernels, weight_in_out: Tensor, bias: Tensor | None) -> None:
        self._pack(kernels, [weight_in_out.t()], None, bias)

    @classmethod
    def from_rows(cls, kernels: Kernels, parts: list[Tensor], scale: Tensor | None, bias: Tensor | None
                  ) -> "PackedMatrix":
        """The matrix a checkpoint stores as `parts` ([rows_i, in] each, one dtype; their rows follow one another),
        each input column scaled by `scale` [in] (a folded norm gain), packed in one pass: the panels of
        PackedMatrix((torch.cat(parts).float() * scale).t(), bias), with no concatenated or float copy."""
        packed = cls.__new__(cls)
        packed._pack(kernels, parts, scale, bias)
        return packed

    def _pack(self, kernels: Kernels, parts: list[Tensor], scale: Tensor | None, bias: Tensor | None) -> None:
        # float32, bfloat16 and float16 are read as stored (sp_pack_parts); any other dtype as float32
        parts = [(part if part.dtype in SOURCE_DTYPES else part.float()).detach().contiguous() for part in parts]
        (dtype,) = {part.dtype for part in parts}
        in_features, out_features = parts[0].shape[1], sum(part.shape[0] for part in parts)
        scale = None if scale is None else scale.detach().float().contiguous()
        self.panels = torch.empty(-(-out_features // kernels.panel_width) * in_features * kernels.panel_width,
                                  dtype=torch.float16)
        kernels.lib.sp_pack_parts((ctypes.c_void_p * len(parts))(*[part.data_ptr() for part in parts]),
                                  (ctypes.c_int32 * len(parts))(*[part.shape[0] for part in parts]), len(parts),
                                  SOURCE_DTYPES[dtype], None if scale is None else scale.data_ptr(), in_features,
                                  self.panels.data_ptr())
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.struct = Matrix(self.panels.data_ptr(), 0 if self.bias is None else self.bias.data_ptr(),
                             in_features, out_features)
        self.kernels = kernels
        self.out_features = out_features

    def __call__(self, x: Tensor) -> Tensor:
        # x: [rows, in] float32 -> [rows, out]
        x = x.contiguous()
        y = x.new_empty(x.shape[0], self.out_features)
        self.kernels.lib.sp_matmul(ctypes.byref(self.struct), x.data_ptr(), x.shape[0], y.data_ptr())
        return y


def fits(kernels: Kernels, hidden: int, head_dim: int, ffn: int) -> str:
    """'' if the kernels take a model of these widths, else why not (they work in whole vectors)."""
    odd = [f"{name} {value}" for name, value in (("hidden size", hidden), ("head_dim", head_dim), ("FFN", ffn))
           if value % kernels.vector_width]
    return f"{', '.join(odd)} not a multiple of {kernels.vector_width}" if odd else ""


class NativeModel:
    """A whole decoder for the kernels: the tensors it reads stay owned by the torch model (they must not be
    reallocated while this lives); `forward` runs one pass of rows."""

    def __init__(self, kernels: Kernels, *, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int,
                 vocab: int, max_seq: int, eps_times_dim: float, embed: Tensor, cos: Tensor, sin: Tensor,
                 layers: list[tuple[PackedMatrix, PackedMatrix, PackedMatrix, PackedMatrix, Tensor, Tensor]],
                 head: PackedMatrix) -> None:
        for tensor in (embed, cos, sin):
            assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        self.kernels = kernels
        self.keep = (embed, cos, sin, layers, head)
        self.layer_structs = (Layer * len(layers))(*[
            Layer(qkv.struct, o.struct, gate_up.struct, down.struct, k.data_ptr(), v.data_ptr())
            for qkv, o, gate_up, down, k, v in layers])
        self.model = Model(len(layers), hidden, heads, kv_heads, head_dim, ffn, vocab, max_seq, eps_times_dim,
                           head_dim ** -0.5, embed.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                           self.layer_structs, head.struct)
        self._model_ref = ctypes.byref(self.model)
        self.hidden, self.vocab = hidden, vocab
        self._rows_fit = 0
        self._scratch = self._x = torch.empty(0)

    def forward(self, fields: array.array, masks: list[int] | None, logit_rows: array.array) -> Tensor:
        """One pass. fields: ROW_FIELDS int32 per row ('i' array); masks: per row the address of its mask row (bool
        [end]), 0 for none, or None when no row has one; logit_rows: the rows whose logits are wanted ('i' array).
        Returns logits [len(logit_rows), vocab] (float32)."""
        count = len(fields) // ROW_FIELDS
        if count > self._rows_fit:  # scratch for this many rows (kept: a pass is usually no wider than the last)
            self._scratch = torch.empty(self.kernels.lib.sp_scratch_floats(self._model_ref, count))
            self._x = torch.empty(count * self.hidden)
            self._rows_fit = count
        logits = torch.empty(len(logit_rows), self.vocab)
        mask_rows = None if masks is None else (ctypes.c_void_p * count)(*masks)
        self.kernels.lib.sp_forward(self._model_ref, fields.buffer_info()[0], mask_rows, count,
                                    logit_rows.buffer_info()[0], len(logit_rows), logits.data_ptr(), self._x.data_ptr(),
                                    self._scratch.data_ptr())
        return logits
