"""`specpipe bench` from start to end: prompts in, figures out."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from pipeline.bench.background import running
from pipeline.bench.config import BenchConfig
from pipeline.bench.figures import Figures, figures
from pipeline.bench.llama_cpp import (
    SWEPT_DRAFT_P_MIN,
    LlamaCppBuild,
    LlamaCppRunner,
    LlamaServer,
    ServerConfig,
    default_root,
)
from pipeline.bench.ours import Contender, PipelineRunner, our_contenders, start_cluster, worker_clocks
from pipeline.bench.peers import HfRunner, load_models
from pipeline.bench.records import Round
from pipeline.bench.theory import median_round_trip, predict, predict_concurrent
from pipeline.prompts import encode_prompt, select_prompts
from workers.bundled import HELDOUT_PROMPTS
from workers.model.checkpoint import load_tokenizer
from workers.worker_settings import resolved_dtype

HF_PEERS = (Contender("hf target-only", "hf-target-only", None), Contender("hf assisted", "hf-assisted", None))
# transformers' assisted generation takes one sequence at a time, and the llama.cpp peer is run with one server
# slot: at a higher concurrency they do not run
ONE_AT_A_TIME = frozenset({"hf-assisted", "llama.cpp-target-only", "llama.cpp-speculative"})


def llama_cpp_contenders(ks: tuple[int, ...]) -> list[Contender]:
    """llama.cpp's target alone, and its speculative decoding with draft max = each of our k, at its default
    --spec-draft-p-min and at SWEPT_DRAFT_P_MIN."""
    return [Contender("llama.cpp target-only", "llama.cpp-target-only", None),
            *(Contender(f"llama.cpp spec k={k}", "llama.cpp-speculative", k) for k in ks),
            *(Contender(f"llama.cpp spec k={k} p-min={SWEPT_DRAFT_P_MIN}", "llama.cpp-speculative", k,
                        draft_p_min=SWEPT_DRAFT_P_MIN) for k in ks)]


def llama_cpp_build(config: BenchConfig) -> LlamaCppBuild | None:
    """The llama.cpp build, when asked for and all there; else None, having said on stderr why and how to make it."""
    if "llama.cpp" not in config.peers:
        return None
    build = LlamaCppBuild(default_root())
    missing = build.missing([config.models.target_dir, config.models.draft_dir])
    if missing:
        print(f"[coord] bench: the llama.cpp peer is left out: {missing}", file=sys.stderr)
        return None
    return build


def start_llama_cpp(build: LlamaCppBuild, config: BenchConfig, contenders: list[Contender], cores: tuple[int, ...],
                    stack: contextlib.ExitStack) -> dict[str, LlamaCppRunner]:
    """A llama-server per llama.cpp configuration, each pinned to `cores` (our workers') with a thread per core
    (per core our workers' threads ask for, where they are not pinned) for each model."""
    threads = len(cores) or sum(config.workers.threads_of(role) for role in ("draft", "target"))
    target, draft = build.gguf(config.models.target_dir), build.gguf(config.models.draft_dir)
    runners = {}
    for contender in contenders:
        if contender.system != "llama.cpp":
            continue
        speculative = contender.mode == "llama.cpp-speculative"
        server_config = ServerConfig(target, draft if speculative else None, contender.k if speculative else None,
                                     threads, cores, draft_p_min=contender.draft_p_min)
        server = LlamaServer(build, server_config)
        stack.callback(server.close)
        runners[contender.name] = LlamaCppRunner(server, config.max_new_tokens)
    return runners

Key = tuple[str, int]  # (configuration name, concurrency)


@dataclass
class BenchResult:
    configs: list[Figures]  # by concurrency, then configuration
    # every one of our configurations at every concurrency made exactly target-only's tokens at concurrency 1
    identical_greedy_outputs: bool
    peers_identical: dict[str, str] = field(default_factory=dict)  # peer -> "n/m prompts identical to ours"
    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)
    # the (configuration, concurrency) whose tokens differed: {"config", "concurrency", "prompts": [indices]}
    differing: list[dict] = field(default_factory=list)


def machine() -> dict[str, str]:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def read_prompt_ids(config: BenchConfig) -> tuple[list[list[int]], list[list[int]], int | None]:
    """The warm-up prompts and the measured ones, as token ids, and the tokenizer's pad token (if any)."""
    prompts = select_prompts(config.prompts, HELDOUT_PROMPTS)
    tokenizer = load_tokenizer(config.models.target_dir)
    warm, measured = ([encode_prompt(tokenizer, text) for text in texts]
                      for texts in (prompts.warmup, prompts.measured))
    return warm, measured, getattr(tokenizer, "pad_token_id", None)


def rounds_of(count: int, concurrency: int) -> list[list[int]]:
    """The measured prompts' indices in rounds of `concurrency` (the last may be shorter)."""
    return [list(range(start, min(start + concurrency, count))) for start in range(0, count, concurrency)]


def worker_cores(cluster) -> tuple[int, ...]:
    """Every core our workers are pinned to (none: not pinned)."""
    specs = [spec for spec in (cluster.config.target, cluster.config.draft) if spec is not None]
    return tuple(sorted({core for spec in specs for core in spec.cores}))


def settle(cluster) -> None:
    """Waits out our workers' busy-polling after their last request (LocalCluster spins the target, and the draft
    beside the coordinator, a few tens of milliseconds for the next one), so that a peer's run starts on idle
    cores rather than beside two spinning processes."""
    time.sleep(cluster.config.target_spin_ms / 1000 + 0.02)


def runs_at(contender: Contender, concurrency: int) -> bool:
    return concurrency == 1 or contender.mode not in ONE_AT_A_TIME


def run_bench(config: BenchConfig, command: str = "", progress: bool = True) -> BenchResult:
    """Every configuration at every concurrency, ascending: at each, a warm-up round per configuration,
    then for each repetition and each round of prompts every configuration runs that round in turn (so the
    machine's slow and fast spells fall on all of them alike)."""
    config.validate()
    warm, measured, pad_id = read_prompt_ids(config)
    build = llama_cpp_build(config)
    contenders = (our_contenders(config.k, config.max_branches)
                  + (list(HF_PEERS) if "transformers" in config.peers else [])
                  + (llama_cpp_contenders(config.k) if build is not None else []))
    levels = config.concurrencies
    schedule = {c: [contender for contender in contenders if runs_at(contender, c)] for c in levels}
    runs: dict[Key, list[Round]] = {(x.name, c): [] for c in levels for x in schedule[c]}
    warmups: dict[Key, list[Round]] = {(x.name, c): [] for c in levels for x in schedule[c]}
    with running(config.background), start_cluster(config) as cluster, contextlib.ExitStack() as servers:
        clocks = worker_clocks(cluster)
        runners = {c.name: PipelineRunner(cluster, c, config.max_new_tokens, clocks, max(config.concurrency),
                                          config.prefill_chunk)
                   for c in contenders if c.ours}
        eos = cluster.limits().eos_ids
        if "transformers" in config.peers:
            torch.set_num_threads(config.workers.threads)  # in this process, beside the draft: as each worker
            target, draft = load_models(config.models.target_dir, config.models.draft_dir)
            runners["hf target-only"] = HfRunner(target, None, config.max_new_tokens, eos, pad_id)
            runners["hf assisted"] = HfRunner(target, draft, config.max_new_tokens, eos, pad_id)
        if build is not None:
            runners |= start_llama_cpp(build, config, contenders, worker_cores(cluster), servers)
        total = sum(len(schedule[c]) * ((1 if warm else 0) + len(rounds_of(len(measured), c)) * config.repetitions)
                    for c in levels)
        with tqdm(total=total, desc="bench", unit="round", file=sys.stderr, disable=not progress) as bar:
            for c in levels:
                if warm:
                    for contender in schedule[c]:
                        bar.set_postfix_str(f"{contender.name} warm-up, concurrency {c}")
                        warmups[contender.name, c].append(runners[contender.name](warm, c))
                        bar.update()
                # interleaved, round by round: the machine's slow and fast spells fall on every configuration
                for _ in range(config.repetitions):
                    for indices in rounds_of(len(measured), c):
                        prompts = [measured[i] for i in indices]
                        for contender in schedule[c]:
                            bar.set_postfix_str(f"{contender.name}, concurrency {c}")
                            if not contender.ours:
                                settle(cluster)
                            runs[contender.name, c].append(runners[contender.name](prompts, c, indices))
                            bar.update()
    result = summarize(config, contenders, runs, warmups, command)
    if build is not None:
        result.settings["llama_cpp"] = build.version()
    return result


def tokens_by_prompt(rounds: list[Round]) -> list[tuple[int, list[int]]]:
    """(prompt index, tokens) of every generation, in the order run (repetition by repetition)."""
    return [(index, g.token_ids) for r in rounds for index, g in zip(r.prompts, r.generations)]


def summarize(config: BenchConfig, contenders: list[Contender], runs: dict[Key, list[Round]],
              warmups: dict[Key, list[Round]], command: str) -> BenchResult:
    levels = sorted({c for _, c in runs})
    by_key: dict[Key, Figures] = {}
    for c in levels:
        for x in contenders:
            if (x.name, c) in runs:
                by_key[x.name, c] = figures(x.name, x.mode, x.k, x.system, runs[x.name, c],
                                            warmups.get((x.name, c), []), c, x.k_policy)
    results = list(by_key.values())  # by concurrency, then configuration
    for (name, c), result in by_key.items():
        baseline, hf_baseline = by_key[("target-only", c)], by_key.get(("hf target-only", c))
        llama_cpp_baseline = by_key.get(("llama.cpp target-only", c))
        result.speedup_vs_target_only = result.tokens_per_s / baseline.tokens_per_s
        if hf_baseline is not None:
            result.speedup_vs_hf_target_only = result.tokens_per_s / hf_baseline.tokens_per_s
        if llama_cpp_baseline is not None:
            result.speedup_vs_llama_cpp_target_only = result.tokens_per_s / llama_cpp_baseline.tokens_per_s
        if c == 1:
            decode_step_s = median_round_trip(runs["target-only", 1], "target", "decode")
            predict(result, baseline, decode_step_s, runs.get((f"serial k={result.k}", 1)), runs[name, c])
        else:
            predict_concurrent(result)
    # the reference: target-only at concurrency 1 (or at the lowest concurrency run), prompt by prompt
    reference_level = levels[0]
    reference: dict[int, list[int]] = {}
    for index, tokens in tokens_by_prompt(runs["target-only", reference_level]):
        reference.setdefault(index, tokens)
    ours = {x.name for x in contenders if x.ours}
    differing, peers = [], {}
    for (name, c), rounds in runs.items():
        made = tokens_by_prompt(rounds)
        if name in ours:
            prompts = sorted({index for index, tokens in made if tokens != reference.get(index)})
            if prompts:
                differing.append({"config": name, "concurrency": c, "prompts": prompts})
        else:
            same = sum(tokens == reference.get(index) for index, tokens in made)
            peers[name if c == 1 else f"{name} at concurrency {c}"] = f"{same}/{len(made)}"
    threads = config.workers.threads
    settings = {"prompts": config.prompts.count, "warmup": config.prompts.warmup,
                "repetitions": config.repetitions, "max_new_tokens": config.max_new_tokens,
                "prefill_chunk": config.prefill_chunk, "k": list(config.k),
                "max_branches": list(config.max_branches), "concurrency": list(config.concurrency),
                "identity_reference": f"target-only at concurrency {reference_level}", "threads": threads,
                "target_threads": config.workers.threads_of("target"),
                "draft_threads": config.workers.threads_of("draft"),
                "dtype": resolved_dtype(config.workers.dtype, config.workers.target_device),
                "prompts_file": str(config.prompts.file or HELDOUT_PROMPTS), "command": command,
                "placement": f"{config.workers.threads_of('target')} core(s) for the target worker, "
                             f"{config.workers.threads_of('draft')} for the draft; transformers in the coordinator with "
                             f"{threads} thread(s); llama.cpp's server on our workers' cores with a thread per core for "
                             f"each model, at its default --spec-draft-p-min and {SWEPT_DRAFT_P_MIN}: each engine's "
                             "best configuration on the same cores",
                "peers": list(config.peers), "background_load": config.background.describe()}
    return BenchResult(results, not differing, peers, machine(), settings, differing)
