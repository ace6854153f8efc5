"""Our three modes through one running pipeline: the workers start once and serve every configuration."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.algorithm.generation import generate
from pipeline.bench.config import BenchConfig
from pipeline.bench.records import Round, from_pipeline
from pipeline.config import DecodeConfig
from pipeline.runtime.cluster import LocalCluster, cluster_config
from pipeline.runtime.critical_path import split_target_time
from pipeline.runtime.tracing import ClockOffset, ProcessSpans, collect_spans, measure_offset, start_tracing
from workers.protocol.limits import MAX_TRACE_SPANS
from workers.spans import SpanRecorder


@dataclass(frozen=True)
class Contender:
    """One configuration of the benchmark: how it is named and what kind of system runs it. The name holds
    no concurrency: each configuration runs at every one (Figures.concurrency)."""

    name: str
    mode: str  # target-only | serial | overlap; hf-target-only | hf-assisted; llama.cpp-target-only | llama.cpp-speculative
    k: int | None  # window size, or the largest one (None: no window, or the peer's own schedule)
    max_branches: int | None = None  # overlap: outcomes drafted ahead at most
    k_policy: str = "fixed"  # fixed | adaptive | goodput (DecodeConfig.k_policy)
    draft_p_min: float | None = None  # llama.cpp: its --spec-draft-p-min (None: its default, 0 in this build)

    @property
    def system(self) -> str:
        """Whose engine runs it: specpipe, transformers or llama.cpp."""
        if self.mode.startswith("hf-"):
            return "transformers"
        if self.mode.startswith("llama.cpp-"):
            return "llama.cpp"
        return "specpipe"

    @property
    def ours(self) -> bool:
        return self.system == "specpipe"


def our_contenders(ks: tuple[int, ...],
                   max_branches: tuple[int, ...] = (DecodeConfig.max_branches,)) -> list[Contender]:
    """target-only; serial and overlap at each fixed k (overlap once per --max-branches value); and overlap
    with the goodput controller choosing each window between 0 and the largest k."""
    contenders = [Contender("target-only", "target-only", None)]
    for k in ks:
        contenders.append(Contender(f"serial k={k}", "serial", k))
        for branches in max_branches:
            name = f"overlap k={k}" + (f" b={branches}" if len(max_branches) > 1 else "")
            contenders.append(Contender(name, "overlap", k, branches))
    k_max = max(ks)
    contenders.append(Contender(f"overlap goodput k<={k_max}", "overlap", k_max, max(max_branches), "goodput"))
    return contenders


def start_cluster(config: BenchConfig) -> LocalCluster:
    """Both workers as `specpipe launch` starts them (cores of their own), with a KV slot per sequence of the
    largest concurrency: every configuration at every concurrency runs on them."""
    return LocalCluster(cluster_config(config.models, config.workers, "overlap", max(config.concurrency)))


def worker_clocks(cluster: LocalCluster) -> dict[str, ClockOffset]:
    """Each worker's clock against ours, measured once: the traces of every generation use them."""
    return {role: measure_offset(cluster.transport, role) for role in cluster.ready}


class PipelineRunner:
    """Generates a round of prompts at once through the cluster in one of our modes, every process traced
    (a few microseconds a request, the same in every mode), so that the target's wall can be split
    into compute, waiting for the draft, and coordinator and IPC (pipeline.runtime.critical_path)."""

    def __init__(self, cluster: LocalCluster, contender: Contender, max_new_tokens: int,
                 clocks: dict[str, ClockOffset], max_seqs: int = 1,
                 prefill_chunk: int = DecodeConfig.prefill_chunk) -> None:
        self.cluster = cluster
        self.contender = contender
        self.clocks = clocks
        self.decode = DecodeConfig(contender.mode, contender.k or 1, max_new_tokens,
                                   max_branches=contender.max_branches or DecodeConfig.max_branches,
                                   k_policy=contender.k_policy, max_seqs=max_seqs, prefill_chunk=prefill_chunk)

    def __call__(self, prompts: list[list[int]], concurrency: int = 1, indices: list[int] | None = None) -> Round:
        """One round: the prompts decoded together, `concurrency` at once (all of them, as bench calls it)."""
        transport = self.cluster.transport
        recorder = transport.spans = SpanRecorder()
        start_tracing(transport, list(self.clocks), MAX_TRACE_SPANS)
        recorder.start(MAX_TRACE_SPANS)
        began = time.perf_counter()
        sequences, engine = generate(transport, prompts, self.decode, self.cluster.limits(), concurrency,
                                     spans=recorder)
        wall = time.perf_counter() - began
        coordinator, _ = recorder.collect()
        workers = {role: ProcessSpans(role, 0, collect_spans(transport, role)[0], clock).aligned()
                   for role, clock in self.clocks.items()}
        split = split_target_time(workers["target"], coordinator, workers.get("draft", []), (began, began + wall))
        return from_pipeline(sequences, engine, wall, indices, split)
