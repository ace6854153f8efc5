"""`specpipe bench` from start to end: prompts in, figures out."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from pipeline.bench.config import BenchConfig
from pipeline.bench.figures import Figures, figures
from pipeline.bench.ours import Contender, PipelineRunner, our_contenders, start_cluster, worker_clocks
from pipeline.bench.peers import HfRunner, load_models
from pipeline.bench.records import Generation
from pipeline.bench.theory import median_round_trip, predict
from pipeline.prompts import select_prompts
from workers.model.checkpoint import load_tokenizer
from workers.models import HELDOUT_PROMPTS
from workers.spec import resolved_dtype

PEERS = (Contender("hf target-only", "hf-target-only", None), Contender("hf assisted", "hf-assisted", None))


@dataclass
class BenchResult:
    configs: list[Figures]
    identical_greedy_outputs: bool  # every one of our configurations made exactly target-only's tokens
    peers_identical: dict[str, str] = field(default_factory=dict)  # peer -> "n/m prompts identical to ours"
    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)


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


def read_prompt_ids(config: BenchConfig) -> tuple[list[list[int]], list[list[int]]]:
    """The warm-up prompts and the measured ones, as token ids."""
    prompts = select_prompts(config.prompts, HELDOUT_PROMPTS)
    tokenizer = load_tokenizer(config.models.target_dir)
    warm, measured = ([tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
                      for texts in (prompts.warmup, prompts.measured))
    return warm, measured


def run_bench(config: BenchConfig, command: str = "", progress: bool = True) -> BenchResult:
    config.validate()
    warm, measured = read_prompt_ids(config)
    contenders = our_contenders(config.k, config.max_branches) + (list(PEERS) if config.peers else [])
    runs: dict[str, list[Generation]] = {c.name: [] for c in contenders}
    warmups: dict[str, list[Generation]] = {c.name: [] for c in contenders}
    with start_cluster(config) as cluster:
        clocks = worker_clocks(cluster)
        runners = {c.name: PipelineRunner(cluster, c, config.max_new_tokens, clocks) for c in contenders
                   if not c.mode.startswith("hf-")}
        if config.peers:
            torch.set_num_threads(config.workers.threads)  # in this process, beside the draft: as each worker
            target, draft = load_models(config.models.target_dir, config.models.draft_dir)
            eos = cluster.limits().eos_ids
            runners["hf target-only"] = HfRunner(target, None, config.max_new_tokens, eos)
            runners["hf assisted"] = HfRunner(target, draft, config.max_new_tokens, eos)
        total = len(contenders) * (len(warm) + len(measured) * config.repetitions)
        with tqdm(total=total, desc="bench", unit="gen", file=sys.stderr, disable=not progress) as bar:
            for contender in contenders:
                for prompt in warm:
                    warmups[contender.name].append(runners[contender.name](prompt))
                    bar.update()
            # interleaved, prompt by prompt: the machine's slow and fast spells fall on every configuration
            for _ in range(config.repetitions):
                for prompt in measured:
                    for contender in contenders:
                        bar.set_postfix_str(contender.name)
                        runs[contender.name].append(runners[contender.name](prompt))
                        bar.update()
    return summarize(config, contenders, runs, warmups, command)


def summarize(config: BenchConfig, contenders: list[Contender], runs: dict[str, list[Generation]],
              warmups: dict[str, list[Generation]], command: str) -> BenchResult:
    results = [figures(c.name, c.mode, c.k, "transformers" if c.mode.startswith("hf-") else "specpipe",
                       runs[c.name], warmups[c.name]) for c in contenders]
    by_name = {r.name: r for r in results}
    baseline = by_name["target-only"]
    hf_baseline = by_name.get("hf target-only")
    decode_step_s = median_round_trip(runs["target-only"], "target", "decode")
    for result in results:
        result.speedup_vs_target_only = result.tokens_per_s / baseline.tokens_per_s
        if hf_baseline is not None:
            result.speedup_vs_hf_target_only = result.tokens_per_s / hf_baseline.tokens_per_s
        predict(result, baseline, decode_step_s, runs.get(f"serial k={result.k}"), runs[result.name])
    reference = [g.token_ids for g in runs["target-only"]]
    identical = all([g.token_ids for g in runs[c.name]] == reference
                    for c in contenders if not c.mode.startswith("hf-"))
    peers = {c.name: f"{sum(g.token_ids == r for g, r in zip(runs[c.name], reference))}/{len(reference)}"
             for c in contenders if c.mode.startswith("hf-")}
    threads = config.workers.threads
    settings = {"prompts": config.prompts.count, "warmup": config.prompts.warmup,
                "repetitions": config.repetitions, "max_new_tokens": config.max_new_tokens, "k": list(config.k),
                "max_branches": list(config.max_branches), "threads": threads,
                "dtype": resolved_dtype(config.workers.dtype, config.workers.target_device),
                "prompts_file": str(config.prompts.file or HELDOUT_PROMPTS), "command": command,
                "placement": f"{threads} core(s) per worker; peers in the coordinator with {threads} thread(s)"}
    return BenchResult(results, identical, peers, machine(), settings)
