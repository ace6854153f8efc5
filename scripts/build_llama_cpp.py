"""Builds llama.cpp for `specpipe bench --peers llama.cpp`, converts the checkpoints to GGUF, checks its tokens.

    python scripts/build_llama_cpp.py                       # the bundled pair, into ~/.cache/specpipe/llama.cpp
    python scripts/build_llama_cpp.py --target DIR --draft DIR [--cache DIR] [--source SDIST_OR_TREE]

1. The source: llama.cpp as vendored in llama-cpp-python's sdist on PyPI (pinned; `pip download`), or
   --source, an sdist or a llama.cpp tree.
2. A Release build with cmake (CPU, -march=native) of llama-server and llama-bench into CACHE/build: about
   3 minutes on this project's 2-vCPU Xeon, 9 on a 2-vCPU EPYC. Done once: a rerun finds it.
3. The converter's one missing dependency (sentencepiece) into CACHE/convert-deps, then each checkpoint to
   GGUF f16 by llama.cpp's own convert_hf_to_gguf.py (scripts/gguf_convert.py teaches it our tokenizer's
   pre-tokenizer without editing llama.cpp's files), named by the checkpoint's content.
4. The check: --check prompts of the bundled held-out set decoded greedily by llama-server (target alone)
   and by specpipe's target-only in this process, token by token; the script prints how many agree.

Nothing here is needed by the tests or by CI; bench goes on without llama.cpp when this was not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from pipeline.bench.llama_cpp import LLAMA_CPP_PYTHON, LlamaCppBuild, LlamaServer, ServerConfig, default_root
from workers.bundled import DRAFT_DIR, HELDOUT_PROMPTS, TARGET_DIR

TARGETS = ("llama-server", "llama-bench")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF")


def say(line: str) -> None:
    print(f"[build-llama.cpp] {line}", flush=True)


def run(command: list[str], **kwargs) -> None:
    done = subprocess.run(command, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"[build-llama.cpp] failed ({done.returncode}): {' '.join(command)}")


def llama_cpp_tree(root: Path, source: Path | None) -> Path:
    """The llama.cpp source tree: --source (a tree, or an sdist to unpack), else the pinned sdist's."""
    if source is not None and source.is_dir():
        tree = source / "vendor" / "llama.cpp" if (source / "vendor" / "llama.cpp").is_dir() else source
        if not (tree / "convert_hf_to_gguf.py").exists():
            raise SystemExit(f"[build-llama.cpp] --source {source}: no llama.cpp tree there")
        return tree
    src = root / "src"
    if source is None:
        sdists = sorted(src.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
        if not sdists:
            say(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist (the source of llama.cpp) from PyPI")
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(src),
                 f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
            sdists = sorted(src.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
        source = sdists[0]
    unpacked = src / source.name.removesuffix(".tar.gz")
    if not (unpacked / "vendor" / "llama.cpp").is_dir():
        say(f"unpacking {source.name}")
        with tarfile.open(source) as archive:
            archive.extractall(src, filter="data")
    return unpacked / "vendor" / "llama.cpp"


def build(tree: Path, build: LlamaCppBuild, jobs: int) -> None:
    binaries = [build.bin_dir / name for name in TARGETS]
    if all(path.exists() for path in binaries):
        say(f"found the build: {build.bin_dir}")
        return
    if shutil.which("cmake") is None:
        raise SystemExit("[build-llama.cpp] cmake is needed (apt install cmake, or pip install cmake)")
    out = build.root / "build"
    began = time.monotonic()
    say(f"configuring {tree} -> {out}")
    run(["cmake", "-S", str(tree), "-B", str(out), *CMAKE_FLAGS], stdout=subprocess.DEVNULL)
    say(f"building {', '.join(TARGETS)} with {jobs} job(s)")
    run(["cmake", "--build", str(out), "-j", str(jobs), "--target", *TARGETS])
    say(f"built in {time.monotonic() - began:.0f} s")


def converter_deps(root: Path) -> Path:
    deps = root / "convert-deps"
    if not (deps / "sentencepiece").is_dir():
        say("installing the converter's sentencepiece into " + str(deps))
        run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "sentencepiece"])
    return deps


def convert(tree: Path, build: LlamaCppBuild, checkpoint: Path, deps: Path) -> Path:
    out = build.gguf(checkpoint)
    if out.exists():
        say(f"found {out.name}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(deps), *filter(None, [os.environ.get("PYTHONPATH")])]))
    say(f"converting {checkpoint} -> {out.name}")
    run([sys.executable, str(Path(__file__).with_name("gguf_convert.py")), str(tree), str(checkpoint),
         "--outtype", "f16", "--outfile", str(partial)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    partial.rename(out)
    return out


def ours(target: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """specpipe's target-only greedy tokens, in this process (the workers' default dtype on this CPU)."""
    from pipeline.algorithm.generation import ModelLimits, generate
    from pipeline.config import DecodeConfig
    from pipeline.runtime.in_process import LocalTransport
    from workers.model import ModelRunner
    from workers.worker_settings import resolved_dtype

    runner = ModelRunner.from_checkpoint(target, dtype=resolved_dtype("auto", "cpu"))
    limits = ModelLimits(runner.config.vocab_size, frozenset(runner.config.eos_token_ids), runner.max_seq_len)
    config = DecodeConfig(mode="target-only", max_new_tokens=max_new_tokens)
    sequences, _ = generate(LocalTransport(None, runner), prompts, config, limits)
    return [list(sequence.generated) for sequence in sequences]


def check(build: LlamaCppBuild, target: Path, count: int, max_new_tokens: int) -> None:
    from pipeline.bench.llama_cpp import to_generation
    from pipeline.prompts import encode_prompt
    from workers.model.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(str(target))
    texts = [json.loads(line) for line in HELDOUT_PROMPTS.read_text().splitlines()[:count]]
    prompts = [encode_prompt(tokenizer, text) for text in texts]
    expected = ours(target, prompts, max_new_tokens)
    server = LlamaServer(build, ServerConfig(build.gguf(target)))
    try:
        got = [to_generation(server.complete(prompt, max_new_tokens)).token_ids for prompt in prompts]
    finally:
        server.close()
    same = sum(a == b for a, b in zip(got, expected))
    say(f"greedy tokens, llama.cpp against specpipe target-only: {same}/{len(prompts)} prompts identical "
        f"({max_new_tokens} new tokens at most)")
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            say(f"  prompt {i}: first differs at new token {first}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=default_root(), help="where the build and GGUFs go")
    parser.add_argument("--source", type=Path, help="an sdist of llama-cpp-python or a llama.cpp tree")
    parser.add_argument("--target", type=Path, default=TARGET_DIR)
    parser.add_argument("--draft", type=Path, default=DRAFT_DIR)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--check", type=int, default=8, help="prompts of the identity check (0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    build_dirs = LlamaCppBuild(args.cache.resolve())
    tree = llama_cpp_tree(build_dirs.root, args.source)
    build(tree, build_dirs, args.jobs)
    deps = converter_deps(build_dirs.root)
    for checkpoint in (args.target, args.draft):
        convert(tree, build_dirs, checkpoint, deps)
    if args.check:
        check(build_dirs, args.target, args.check, args.max_new_tokens)
    say(f"ready: specpipe bench --peers transformers,llama.cpp finds it under {build_dirs.root}")


if __name__ == "__main__":
    main()
