"""Soak: many requests through one pipeline; every output must be right, memory and fds must stay flat.

Starts the workers once (as `specpipe launch` does: one core each, the coordinator beside the draft),
computes each distinct prompt's target-only greedy output once, then sends --requests requests at
--concurrency, in rounds of --sample-every. After each round it samples the resident memory (VmRSS)
and open file descriptors of the coordinator (this process) and both workers. Exit status 1 if any
output differs from its reference or, after --warmup requests, any process's RSS grows by more than
--rss-tolerance-mb or its fd count grows at all (beyond --fd-tolerance).

    python scripts/soak.py                       # 1,000 requests, concurrency 8, 16 new tokens each
    python scripts/soak.py --requests 200 --sample-every 20 --warmup 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from pipeline.algorithm.generation import generate
from pipeline.config import DecodeConfig, ModelsConfig, WorkersConfig
from pipeline.prompts import encode_prompt
from pipeline.runtime.cluster import LocalCluster, cluster_config
from workers.bundled import HELDOUT_PROMPTS, TARGET_DIR
from workers.model.checkpoint import load_tokenizer
from workers.worker_settings import resolved_dtype


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=24, help="each held-out prompt cut to this many tokens")
    parser.add_argument("--mode", default="overlap", choices=["overlap", "serial"])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--sample-every", type=int, default=50, help="requests per round between samples")
    parser.add_argument("--warmup", type=int, default=200, help="requests before the baseline sample")
    parser.add_argument("--rss-tolerance-mb", type=float, default=8.0, help="allowed RSS growth per process")
    parser.add_argument("--fd-tolerance", type=int, default=0, help="allowed growth in open fds per process")
    parser.add_argument("--json", help="write the samples and the verdict to this file")
    args = parser.parse_args()
    if args.warmup % args.sample_every or args.requests % args.sample_every or args.warmup >= args.requests:
        parser.error("--warmup and --requests must be multiples of --sample-every, --warmup < --requests")

    dtype = resolved_dtype(args.dtype, "cpu")  # what the workers make of it, for the report
    tokenizer = load_tokenizer(TARGET_DIR)
    texts = [json.loads(line) for line in HELDOUT_PROMPTS.read_text().splitlines()]
    prompts = [encode_prompt(tokenizer, t)[: args.prompt_tokens] for t in texts]
    config = cluster_config(ModelsConfig(), WorkersConfig(dtype=args.dtype), args.mode, args.concurrency)
    decode = DecodeConfig(args.mode, args.k, args.new_tokens)
    began = time.perf_counter()
    samples: list[dict] = []
    wrong = tokens = 0
    with LocalCluster(config) as cluster:
        pids = {"coord": os.getpid(), **{role: process.pid for role, process in cluster.processes.items()}}
        limits = cluster.limits()
        done, _ = generate(cluster.transport, prompts, DecodeConfig("target-only", 1, args.new_tokens), limits,
                           args.concurrency)
        references = [sequence.generated for sequence in done]
        print(f"[soak] {len(references)} target-only references in {time.perf_counter() - began:.1f} s; pids {pids}",
              file=sys.stderr, flush=True)
        soak_began = time.perf_counter()
        for start in range(0, args.requests, args.sample_every):
            batch = [start + i for i in range(args.sample_every)]
            done, _ = generate(cluster.transport, [prompts[i % len(prompts)] for i in batch], decode, limits,
                               args.concurrency)
            for request, sequence in zip(batch, done):
                tokens += len(sequence.generated)
                if sequence.generated != references[request % len(prompts)]:
                    wrong += 1
                    print(f"[soak] request {request} (prompt {request % len(prompts)}) differs from target-only",
                          file=sys.stderr, flush=True)
            samples.append({"requests": batch[-1] + 1, "s": time.perf_counter() - soak_began,
                            **{f"{name}_rss_mb": rss_mb(pid) for name, pid in pids.items()},
                            **{f"{name}_fds": open_fds(pid) for name, pid in pids.items()}})
        soak_s = time.perf_counter() - soak_began

    names = list(pids)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; dtype {dtype}; {args.mode} k={args.k};"
          f" {args.requests} requests at concurrency {args.concurrency}, prompts of <= {args.prompt_tokens} "
          f"tokens ({len(prompts)} distinct), {args.new_tokens} new tokens each")
    print(f"{'requests':>8}{'s':>8}" + "".join(f"{n + ' MB':>12}" for n in names)
          + "".join(f"{n + ' fds':>12}" for n in names))
    for sample in samples:
        print(f"{sample['requests']:>8}{sample['s']:>8.1f}"
              + "".join(f"{sample[n + '_rss_mb']:>12.1f}" for n in names)
              + "".join(f"{sample[n + '_fds']:>12}" for n in names))
    baseline = next(s for s in samples if s["requests"] == args.warmup)
    after = [s for s in samples if s["requests"] >= args.warmup]
    final = samples[-1]
    problems = []
    print(f"\n{'process':<8}{'RSS at warm-up':>16}{'RSS end':>10}{'RSS max':>10}{'growth':>9}{'fds at warm-up':>16}"
          f"{'fds end':>9}{'fds max':>9}")
    for name in names:
        rss = [s[f"{name}_rss_mb"] for s in after]
        fds = [s[f"{name}_fds"] for s in after]
        growth = max(rss) - rss[0]
        print(f"{name:<8}{rss[0]:>13.1f} MB{rss[-1]:>7.1f} MB{max(rss):>7.1f} MB{growth:>+6.1f} MB{fds[0]:>16}"
              f"{fds[-1]:>9}{max(fds):>9}")
        if growth > args.rss_tolerance_mb:
            problems.append(f"{name} RSS grew {growth:.1f} MB after warm-up (tolerance {args.rss_tolerance_mb} MB)")
        if max(fds) - fds[0] > args.fd_tolerance:
            problems.append(f"{name} open fds grew from {fds[0]} to {max(fds)} (tolerance {args.fd_tolerance})")
    if wrong:
        problems.append(f"{wrong} of {args.requests} outputs differ from target-only greedy")
    print(f"\n{args.requests} requests, {tokens} tokens in {soak_s:.1f} s ({tokens / soak_s:.1f} tokens/s); "
          f"{args.requests - wrong} outputs identical to target-only greedy; "
          f"total run {time.perf_counter() - began:.1f} s")
    print("FAIL: " + "; ".join(problems) if problems else "PASS: outputs correct, memory and fds flat after warm-up")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "dtype": dtype, "samples": samples,
                                               "baseline": baseline, "final": final, "wrong": wrong,
                                               "soak_s": soak_s, "problems": problems}, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
