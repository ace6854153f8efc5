"""Where one decode step goes, for the target and the draft: ours against the weight-streaming floor and llama.cpp.

    python scripts/profile_step.py [--target DIR] [--draft DIR] [--context 200] [--repeats 200] [--json-out FILE]

Every figure comes from this run, one core (pinned), interleaved where two are compared:
- floor: the weights' bytes per token (fp16) over the read bandwidth measured here, streaming a buffer of the
  same size again and again (what a decode loop sees) and one of 1 GiB (DRAM alone);
- specpipe step: `runner.forward` of one token at --context, `--dtype fp16-weights`; of it, the kernels' one C
  call (cpu_native), of that the matrix products alone (every matrix once, in the order a step reads them), the
  rest of the call being attention, norms, RoPE, SwiGLU and the KV cache writes; and the Python around the call;
- the torch path the kernels replaced (fbgemm's fp16 GEMM and ~20 aten ops a layer, SPECPIPE_CPU_KERNELS=torch):
  its step and its aten ops per step, counted by torch's profiler;
- a target-only decode round trip through the real pipeline (ZeroMQ, both processes pinned as launch pins them):
  the worker's compute and what the coordinator, IPC and the worker's message handling add;
- llama.cpp: llama-bench's tg128 at depth --context, one thread, the same core (when scripts/build_llama_cpp.py
  has built it).
"""

from __future__ import annotations

import argparse
import array
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from pipeline.bench.run import machine
from workers.backends import cpu_native
from workers.bundled import DRAFT_DIR, TARGET_DIR
from workers.model import ModelRunner


def median_us(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - began)
    return statistics.median(samples) / 1e3


def bandwidth_gbs(kernels: cpu_native.Kernels, nbytes: int, repeats: int = 20) -> float:
    buffer = torch.ones(nbytes // 4)
    seconds = median_us(lambda: kernels.lib.sp_read(buffer.data_ptr(), buffer.numel()), repeats) / 1e6
    return nbytes / seconds / 1e9


def weight_bytes(runner: ModelRunner) -> int:
    """What a decode step reads of the weights: every packed fp16 matrix, and one embedding row (negligible)."""
    return sum(getattr(module, name).native.panels.numel() * 2 for module, name, _ in runner.model.matrices())


def step_profile(directory: Path, context: int, repeats: int) -> dict:
    runner = ModelRunner.from_checkpoint(directory, dtype="fp16-weights")
    native = runner.model.native
    if native is None:
        raise SystemExit(f"no CPU kernels here: {runner.numerics}")
    runner.forward(list(range(3, 3 + context)), 0, prompt_pass=True)
    fields, logit_rows = array.array("i", (7, 0, context, context, context + 1)), array.array("i", [0])
    matrices = [getattr(module, name).native.struct for module, name, _ in runner.model.matrices()]
    x = torch.randn(max(matrix.in_features for matrix in matrices))
    y = torch.empty(max(matrix.out_features for matrix in matrices))

    def products() -> None:  # every matrix once, one row, in one C call
        native.kernels.lib.sp_products(native._model_ref, x.data_ptr(), y.data_ptr())

    samples: dict[str, list[float]] = {"step": [], "kernels": [], "products": []}
    with torch.inference_mode():
        for _ in range(5):  # interleaved rounds: the machine's slow spells fall on all three
            samples["step"].append(median_us(lambda: runner.forward([7], context), repeats // 5))
            samples["kernels"].append(median_us(lambda: native.forward(fields, None, logit_rows), repeats // 5))
            samples["products"].append(median_us(products, repeats // 5))
    us = {name: statistics.median(values) for name, values in samples.items()}
    return {"weights_mb": weight_bytes(runner) / 1e6, "step_ms": us["step"] / 1e3, "kernels_ms": us["kernels"] / 1e3,
            "products_ms": us["products"] / 1e3, "rest_of_kernels_ms": (us["kernels"] - us["products"]) / 1e3,
            "python_ms": (us["step"] - us["kernels"]) / 1e3, "kernels": runner.numerics}


def torch_path_profile(directory: Path, context: int, repeats: int) -> dict:
    """The step as it was before the kernels: fbgemm fp16 products and aten ops, as SPECPIPE_CPU_KERNELS=torch."""
    loaded = cpu_native.load
    cpu_native.load = lambda: "off"  # PackedFp16 and the model ask the module: fbgemm it is
    try:
        runner = ModelRunner.from_checkpoint(directory, dtype="fp16-weights")
    finally:
        cpu_native.load = loaded
    runner.forward(list(range(3, 3 + context)), 0, prompt_pass=True)
    with torch.inference_mode():
        step_us = median_us(lambda: runner.forward([7], context), repeats)
        with torch.profiler.profile() as profile:
            runner.forward([7], context)
    # top-level aten ops: each one a dispatch from Python (nested ones are inside those)
    ops = sum(1 for event in profile.events() if event.name.startswith("aten::") and event.cpu_parent is None)
    return {"step_ms": step_us / 1e3, "aten_ops": ops, "layers": runner.config.num_layers}


def pipeline_round_trip(prompts: int, new_tokens: int) -> dict:
    """Target-only through the real pipeline: median decode round trip, and the worker's compute within it."""
    from pipeline.algorithm.generation import generate
    from pipeline.config import DecodeConfig, ModelsConfig, WorkersConfig
    from pipeline.runtime.cluster import LocalCluster, cluster_config

    config = cluster_config(ModelsConfig(), WorkersConfig(), "target-only")
    with LocalCluster(config) as cluster:
        ids = [list(range(3 + i, 203 + i)) for i in range(prompts)]
        trips = []
        for prompt in ids:
            _, engine = generate(cluster.transport, [prompt], DecodeConfig("target-only", 1, new_tokens),
                                 cluster.limits())
            trips += [trip for trip in engine.trips if trip.kind == "decode"]
    round_trip = statistics.median(t.round_trip_s for t in trips) * 1e3
    busy = statistics.median(t.busy_s for t in trips) * 1e3
    return {"round_trip_ms": round_trip, "worker_compute_ms": busy, "coordination_ms": round_trip - busy,
            "steps": len(trips)}


def llama_cpp_profile(directory: Path, context: int, core: int) -> dict | None:
    from pipeline.bench.llama_cpp import LlamaCppBuild, default_root

    build = LlamaCppBuild(default_root())
    gguf = build.gguf(directory)
    if not (build.bench_tool.exists() and gguf.exists()):
        return None
    done = subprocess.run([str(build.bench_tool), "-m", str(gguf), "-p", "0", "-n", "128", "-d", str(context),
                           "-t", "1", "-r", "5", "-o", "json"], capture_output=True, text=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    (result,) = json.loads(done.stdout)
    return {"ms_per_token": 1e3 / result["avg_ts"], "stddev_ts": result["stddev_ts"], "build": result.get("build_commit")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=TARGET_DIR)
    parser.add_argument("--draft", type=Path, default=DRAFT_DIR)
    parser.add_argument("--context", type=int, default=200, help="positions in the KV cache at the step")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    kernels = cpu_native.load()
    if isinstance(kernels, str):
        raise SystemExit(f"no CPU kernels here: {kernels}")
    about = machine()
    report: dict = {"machine": f"{about['cpu']}, core {core}, torch {about['torch']}", "date": about["date"],
                    "context": args.context}
    for role, directory in (("target", args.target), ("draft", args.draft)):
        ours = step_profile(directory, args.context, args.repeats)
        nbytes = int(ours["weights_mb"] * 1e6)
        warm, dram = bandwidth_gbs(kernels, nbytes), bandwidth_gbs(kernels, 1 << 30, repeats=5)
        report[role] = {**ours, "bandwidth_gbs": warm, "dram_gbs": dram,
                        "floor_ms": nbytes / warm / 1e6, "dram_floor_ms": nbytes / dram / 1e6,
                        "torch_path": torch_path_profile(directory, args.context, args.repeats // 2),
                        "llama_cpp": llama_cpp_profile(directory, args.context, core)}
    report["pipeline_target_only"] = pipeline_round_trip(prompts=4, new_tokens=64)
    print(table(report))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))


def table(report: dict) -> str:
    lines = [f"one decode step at {report['context']} cached positions, one core ({report['machine']}, "
             f"{report['date']}); ms per token", f"{'':58}{'target':>10}{'draft':>10}"]

    def row(label: str, value) -> None:
        lines.append(f"{label:58}" + "".join(f"{value(report[role]):>10}" for role in ("target", "draft")))

    row("weights read per token (MB, fp16)", lambda r: f"{r['weights_mb']:.1f}")
    row("read bandwidth, a buffer of that size (GB/s)", lambda r: f"{r['bandwidth_gbs']:.1f}")
    row("floor: weights / that bandwidth", lambda r: f"{r['floor_ms']:.3f}")
    row("floor from DRAM alone (1 GiB buffer)", lambda r: f"{r['dram_floor_ms']:.3f}")
    row("specpipe step (runner.forward, fp16-weights)", lambda r: f"{r['step_ms']:.3f}")
    row("  the kernels' one C call", lambda r: f"{r['kernels_ms']:.3f}")
    row("    matrix products (every matrix once)", lambda r: f"{r['products_ms']:.3f}")
    row("    attention, norms, RoPE, SwiGLU, KV writes", lambda r: f"{r['rest_of_kernels_ms']:.3f}")
    row("  Python around the call", lambda r: f"{r['python_ms']:.3f}")
    row("  step / floor", lambda r: f"{r['step_ms'] / r['floor_ms']:.2f}x")
    row("the torch path it replaced (fbgemm + aten ops)", lambda r: f"{r['torch_path']['step_ms']:.3f}")
    row("  aten ops per step (per layer)", lambda r: f"{r['torch_path']['aten_ops']} "
                                                    f"({r['torch_path']['aten_ops'] / r['torch_path']['layers']:.0f})")
    row("llama.cpp (llama-bench tg128 at that depth, 1 thread)",
        lambda r: "-" if r["llama_cpp"] is None else f"{r['llama_cpp']['ms_per_token']:.3f}")
    pipe = report["pipeline_target_only"]
    lines.append(f"target-only through the pipeline: decode round trip {pipe['round_trip_ms']:.3f} ms, of which the "
                 f"worker's compute {pipe['worker_compute_ms']:.3f} ms and coordinator + IPC "
                 f"{pipe['coordination_ms']:.3f} ms (median of {pipe['steps']} steps)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
