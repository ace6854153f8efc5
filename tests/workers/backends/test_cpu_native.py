"""specpipe's CPU kernels, on every instruction-set path they have: they build, agree with torch, and give each row
the same bits whatever shares its pass; without them fp16-weights falls back to fbgemm and says so."""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workers.backends import cpu_native
from workers.backends.cpu_features import cpu_flags
from workers.model import ModelRunner
from workers.model.segment import Segment

# the paths of cpu_kernels.c, forced on this machine (a CPU without AVX-512 builds "native" as AVX2)
PATHS = {"native": (), "avx2": ("-mno-avx512f",),
         "plain": ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c", "-mno-avx")}


@functools.cache
def kernels_for(path: str, directory: str) -> cpu_native.Kernels:
    return cpu_native.load_library(cpu_native.build(directory=Path(directory), extra_flags=PATHS[path]))


@pytest.fixture(scope="module", params=list(PATHS))
def kernels(request, tmp_path_factory) -> cpu_native.Kernels:
    if isinstance(cpu_native.load(), str):
        pytest.skip(f"no kernels here: {cpu_native.load()}")
    return kernels_for(request.param, str(tmp_path_factory.getbasetemp() / "kernels"))


@pytest.fixture
def these_kernels(kernels, monkeypatch):
    """Models built in the test use `kernels` (not the machine's default build)."""
    monkeypatch.setattr(cpu_native, "load", lambda: kernels)
    return kernels


def test_each_path_is_the_one_asked_for(kernels, tmp_path_factory):
    assert kernels.panel_width % kernels.vector_width == 0
    flags = cpu_flags()
    directory = str(tmp_path_factory.getbasetemp() / "kernels")
    assert kernels_for("plain", directory).vector_width == 1
    assert kernels_for("plain", directory).describe() == "specpipe CPU kernels (plain C, 1 thread)"
    if {"avx2", "fma", "f16c"} <= flags:
        assert kernels_for("avx2", directory).vector_width == 8
        assert kernels_for("native", directory).vector_width == (16 if "avx512f" in flags else 8)


@pytest.mark.parametrize("shape", [(512, 1024), (64, 40), (1536, 512)], ids=["square-ish", "ragged-panel", "down"])
def test_a_product_is_x_times_the_fp16_matrix_and_each_row_its_own(kernels, shape):
    in_features, out_features = shape
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(in_features, out_features, generator=generator) * 0.05
    bias = torch.randn(out_features, generator=generator)
    matrix = cpu_native.PackedMatrix(kernels, weight, bias)
    x = torch.randn(20, in_features, generator=generator)
    y = matrix(x)
    expected = x.double() @ weight.half().double() + bias.double()
    assert torch.allclose(y.double(), expected, atol=1e-4, rtol=1e-4)
    alone = torch.cat([matrix(x[i : i + 1]) for i in range(20)])
    for count in range(1, 21):  # every row count (several row blocks past 6), from either end: the bits alone
        assert torch.equal(matrix(x[:count]), alone[:count])
        assert torch.equal(matrix(x[20 - count :]), alone[20 - count :])


def panels_of(weight_in_out: torch.Tensor, panel: int) -> torch.Tensor:
    """The kernels' layout, by torch alone: [in, out] rounded to fp16, cut into panels of `panel` columns
    (the last padded with zeros), each panel's rows one after another."""
    in_features, out_features = weight_in_out.shape
    count = -(-out_features // panel)
    padded = torch.zeros(in_features, count * panel, dtype=torch.float16)
    padded[:, :out_features] = weight_in_out.to(torch.float16)
    return padded.view(in_features, count, panel).permute(1, 0, 2).reshape(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(96, 80), (64, 40)], ids=["ragged-panel", "narrow"])
def test_a_matrix_packs_from_its_stored_layout_as_torch_rounds_it(kernels, dtype, shape):
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(2)
    stored = (torch.randn(out_features, in_features, generator=generator) * 3).to(dtype)
    scale = torch.rand(in_features, generator=generator) * 40  # a norm gain times sqrt(d)
    bias = torch.randn(out_features, generator=generator)
    for factor in (scale, None):
        want = panels_of((stored.float() if factor is None else stored.float() * factor).t(), kernels.panel_width)
        for parts in ([stored], [stored[:7], stored[7:40], stored[40:]]):  # whole, or fused from stored pieces
            got = cpu_native.PackedMatrix.from_rows(kernels, parts, factor, bias)
            assert torch.equal(got.panels.view(torch.int16), want.view(torch.int16))
            assert torch.equal(got.bias, bias)
    in_out = cpu_native.PackedMatrix(kernels, stored.t(), None)  # an [in, out] matrix packs the same way
    want = panels_of(stored.float().t(), kernels.panel_width)
    assert torch.equal(in_out.panels.view(torch.int16), want.view(torch.int16))


def runner(directory, **kwargs) -> ModelRunner:
    return ModelRunner.from_checkpoint(directory, dtype="fp16-weights", **kwargs)


@pytest.mark.parametrize("name", ["llama3-gqa", "qwen2", "llama-tied"])
def test_a_whole_model_agrees_with_float32(these_kernels, checkpoints, name):
    directory, _ = checkpoints[name]
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(3))
    ours, reference = runner(directory), ModelRunner.from_checkpoint(directory, dtype="float32")
    assert ours.model.native is not None and ours.numerics == these_kernels.describe()
    # a window, then one-token decode steps: both through the kernels (no prompt pass)
    got = torch.cat([ours.forward(ids[:30], 0, last=30)] + [ours.forward(ids[i : i + 1], i) for i in range(30, 40)])
    want = reference.forward(ids, 0, last=40)
    assert torch.allclose(got, want, atol=3e-2)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_a_row_is_bitwise_the_same_in_a_step_a_window_and_a_batch(these_kernels, checkpoints):
    directory, _ = checkpoints["llama3-gqa"]
    ids = torch.randint(0, 128, (48,), generator=torch.Generator().manual_seed(4)).tolist()
    alone, window, batched = (runner(directory, n_slots=3, max_seq_len=128) for _ in range(3))
    for model in (alone, window, batched):
        model.forward(ids[:20], 0, 0, prompt_pass=True)
        model.forward(ids[:9], 0, 1, prompt_pass=True)
    steps = torch.cat([alone.forward(ids[i : i + 1], i, 0) for i in range(20, 26)])
    assert torch.equal(window.forward(ids[20:26], 20, 0, last=6), steps)
    # the same window beside another sequence's step and three drafted tokens (scratch rows) of a third slot
    segments = [Segment(0, torch.tensor(ids[20:26]), 20, logits=6), Segment(1, torch.tensor(ids[9:10]), 9),
                Segment(2, torch.tensor([5, 6, 7]), 0, torch.tensor([0, 1, 2]), torch.ones(3, 3, dtype=torch.bool).tril(),
                        logits=3)]
    batched.forward(ids[:3], 0, 2, prompt_pass=True)
    batched.truncate(2, 0)
    got = batched.forward_batch(segments)
    assert torch.equal(got[0], steps)
    assert torch.equal(got[1], alone.forward(ids[9:10], 9, 1))
    # a scratch row sees only what its mask allows: its first branch row is a one-token step from empty
    fresh = runner(directory, max_seq_len=128)
    assert torch.equal(got[2][0], fresh.forward([5], 0)[0])


def passes_at(kernels, threads: int, directory) -> list[torch.Tensor]:
    """A prompt pass, a window, decode steps and a batch with drafted rows, at `threads` threads."""
    assert kernels.lib.sp_set_threads(threads) == threads
    try:
        ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(5)).tolist()
        model = runner(directory, n_slots=2, max_seq_len=128)
        out = [model.forward(ids[:24], 0, 0, prompt_pass=True, last=24), model.forward(ids[24:30], 24, 0, last=6)]
        out += [model.forward(ids[i : i + 1], i, 0) for i in range(30, 33)]
        out += model.forward_batch([Segment(0, torch.tensor(ids[33:37]), 33, logits=4),
                                    Segment(1, torch.tensor([5, 6, 7]), 0, torch.tensor([0, 1, 2]),
                                            torch.ones(3, 3, dtype=torch.bool).tril(), logits=3)])
        return out
    finally:
        kernels.lib.sp_set_threads(1)


def test_a_pass_is_bitwise_the_same_at_any_thread_count(these_kernels, checkpoints):
    directory, _ = checkpoints["llama3-gqa"]
    one = passes_at(these_kernels, 1, directory)
    for threads in (2, 3, 5):
        assert all(torch.equal(a, b) for a, b in zip(one, passes_at(these_kernels, threads, directory))), threads
    assert these_kernels.describe().endswith("1 thread)")


def test_threads_apply_to_kernels_loaded_later_and_are_said(monkeypatch):
    if isinstance(cpu_native.load(), str):
        pytest.skip(f"no kernels here: {cpu_native.load()}")
    kernels = cpu_native.load()
    try:
        cpu_native.set_threads(3)
        assert kernels.lib.sp_threads() == 3 and kernels.describe().endswith(", 3 threads)")
        cpu_native.load.cache_clear()  # a process whose kernels load after its --threads was set
        assert cpu_native.load().lib.sp_threads() == 3
    finally:
        cpu_native.set_threads(1)


def test_without_the_kernels_fp16_weights_runs_on_fbgemm_and_says_why(monkeypatch, checkpoints):
    from workers.backends.cpu_fp16 import fp16_weights_available

    monkeypatch.setattr(cpu_native, "load", lambda: "no C compiler (set CC, or install gcc)")
    if not fp16_weights_available.__wrapped__():
        pytest.skip("no fbgemm here either")
    directory, _ = checkpoints["qwen2"]
    model = runner(directory)
    assert model.model.native is None
    assert model.numerics == "fbgemm fp16 (no specpipe CPU kernels: no C compiler (set CC, or install gcc))"
    reference = ModelRunner.from_checkpoint(directory, dtype="float32")
    ids = list(range(3, 23))
    assert torch.allclose(model.forward(ids, 0, last=20), reference.forward(ids, 0, last=20), atol=3e-2)


def test_widths_the_whole_pass_cannot_take_run_its_products_in_torch_and_say_so(these_kernels, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # FFN 180: not a whole number of vectors on any SIMD path
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=180, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = runner(tmp_path)
    if these_kernels.vector_width == 1:
        assert model.model.native is not None  # plain C takes any width
        return
    assert model.model.native is None
    assert model.numerics == (f"{these_kernels.describe()} for the products, torch for the rest "
                              f"(FFN 180 not a multiple of {these_kernels.vector_width})")
    ids = list(range(3, 23))
    reference = ModelRunner.from_checkpoint(tmp_path, dtype="float32")
    assert torch.allclose(model.forward(ids, 0, last=20), reference.forward(ids, 0, last=20), atol=3e-2)


def test_a_compiler_that_fails_is_named_and_a_built_library_is_found_again(tmp_path, monkeypatch):
    first = cpu_native.build(tmp_path)
    assert first.exists() and cpu_native.build(tmp_path) == first
    monkeypatch.setenv("CC", "false")  # /bin/false: a compiler that fails
    monkeypatch.setattr(cpu_native, "_compiler", lambda: "/bin/false")
    with pytest.raises(RuntimeError, match="false failed to build cpu_kernels.c"):
        cpu_native.build(tmp_path / "other")


def test_the_kernels_say_which_widths_they_take(kernels):
    assert cpu_native.fits(kernels, 512, 64, 1536) == ""
    if kernels.vector_width > 1:
        assert "FFN 1500 not a multiple of" in cpu_native.fits(kernels, 512, 64, 1500)


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECPIPE_CACHE", str(tmp_path / "here"))
    assert cpu_native.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("SPECPIPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_native.cache_dir() == tmp_path / "xdg" / "specpipe"
    assert os.environ.get("SPECPIPE_CACHE") is None


def test_drafted_branches_see_only_what_their_mask_shows(these_kernels, checkpoints):
    # three branches forking at positions 20, 19 and 15 of a 20-token context, as the draft drafts ahead
    directory, _ = checkpoints["llama3-gqa"]
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    forks = torch.tensor([20, 19, 15])
    columns = torch.arange(20 + 3)
    mask = (columns[None, :] < forks[:, None]) | (columns[None, :] - 20 == torch.arange(3)[:, None])
    branch = Segment(0, torch.tensor([7, 8, 9]), 20, forks, mask, logits=3)
    ours, reference = runner(directory), ModelRunner.from_checkpoint(directory, dtype="float32")
    for model in (ours, reference):
        model.forward(ids, 0, prompt_pass=True)
    got, want = ours.forward_batch([branch])[0], reference.forward_batch([branch])[0]
    assert torch.allclose(got, want, atol=3e-2)
    # the branch forking at 15 is the token that would follow the context's first 15
    assert torch.allclose(got[2], reference.forward([9], 15)[0], atol=3e-2)


def test_the_library_lists_the_layout_of_every_struct_the_ctypes_copies_name(kernels):
    table = dict(cpu_native.struct_layout(kernels.lib))
    assert table["sp_matrix"] == ctypes.sizeof(cpu_native.Matrix)
    assert table["sp_matrix.out"] == cpu_native.Matrix.out_features.offset
    assert table["sp_layer.v_cache"] == cpu_native.Layer.v_cache.offset
    assert table["sp_model.head"] == cpu_native.Model.head.offset
    assert cpu_native.layout_mismatch(cpu_native.struct_layout(kernels.lib)) == ""


class SwappedMatrix(ctypes.Structure):  # in and out swapped: the same offsets, other names
    _fields_ = [("panels", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("out_features", ctypes.c_int32),
                ("in_features", ctypes.c_int32)]


class NarrowModel(ctypes.Structure):  # eps_times_dim a double: the fields after it move
    _fields_ = [(name, ctypes.c_int32) for name, _ in cpu_native.Model._fields_[:8]] + [
        ("eps_times_dim", ctypes.c_double)] + cpu_native.Model._fields_[9:]


class ShortLayer(ctypes.Structure):  # v_cache missing
    _fields_ = cpu_native.Layer._fields_[:-1]


@pytest.mark.parametrize("struct, message", [
    (("sp_matrix", SwappedMatrix), "sp_matrix's field 2 is in, but SwappedMatrix's is out_features"),
    (("sp_model", NarrowModel), "sp_model.attn_scale is at offset 36, but NarrowModel.attn_scale at 40"),
    (("sp_layer", ShortLayer), "sp_layer.v_cache (offset 104) has no field in ShortLayer"),
    (("sp_other", cpu_native.Matrix), "the library lists no struct sp_other (copied by Matrix)"),
], ids=["field-names", "offset", "missing-field", "missing-struct"])
def test_a_ctypes_copy_unlike_its_c_struct_is_named(kernels, struct, message):
    assert cpu_native.layout_mismatch(cpu_native.struct_layout(kernels.lib), dict([struct])) == message


def test_a_library_whose_structs_differ_is_refused_and_the_loader_says_which_field(tmp_path, monkeypatch):
    path = cpu_native.build(tmp_path)
    wrong = dict(cpu_native.STRUCTS, sp_layer=ShortLayer)
    monkeypatch.setattr(cpu_native, "STRUCTS", wrong)
    refusal = r"a bug.*: sp_layer\.v_cache \(offset 104\) has no field in ShortLayer"
    with pytest.raises(cpu_native.LayoutMismatch, match=refusal):
        cpu_native.load_library(path)
    monkeypatch.setattr(cpu_native, "build", lambda: path)
    monkeypatch.delenv(cpu_native.DISABLE, raising=False)
    reason = cpu_native.load.__wrapped__()  # the reason fp16-weights names when it falls back to fbgemm
    assert isinstance(reason, str) and "cpu_kernels.c's structs differ from their ctypes copies" in reason
    assert "sp_layer.v_cache" in reason


def test_a_forked_child_computes_on_the_one_thread_it_has(kernels):
    matrix = cpu_native.PackedMatrix(kernels, torch.randn(256, 512) * 0.05, None)
    x, y = torch.randn(3, 256), torch.empty(3, 512)
    kernels.lib.sp_set_threads(2)
    try:
        want = matrix(x)
        pid = os.fork()
        if pid == 0:  # the helpers did not come along: a pass that waited for them would never end
            status = 1
            try:
                kernels.lib.sp_matmul(ctypes.byref(matrix.struct), x.data_ptr(), 3, y.data_ptr())
                status = 0 if kernels.lib.sp_threads() == 1 and torch.equal(y, want) else 1
            finally:
                os._exit(status)  # never back into pytest
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        kernels.lib.sp_set_threads(1)


def test_a_pass_right_after_its_threads_start_finishes():
    # helpers that start after the pass was published must still take their share (or it waits forever);
    # in a child process, so that a hang fails the test instead of the suite. The pool is the same C on every path.
    kernels = cpu_native.load()
    if isinstance(kernels, str):
        pytest.skip(f"no kernels here: {kernels}")
    script = (f"import sys, torch\nfrom workers.backends import cpu_native\n"
              f"k = cpu_native.load_library(cpu_native.Path({str(kernels.path)!r}))\n"
              "m = cpu_native.PackedMatrix(k, torch.randn(64, 4096), None)\nx = torch.randn(2, 64)\nwant = m(x)\n"
              "for _ in range(150):\n    k.lib.sp_set_threads(3)\n    assert torch.equal(m(x), want)\n"
              "    k.lib.sp_set_threads(1)\n")
    done = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
