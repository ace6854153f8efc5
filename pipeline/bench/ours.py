"""Our three modes through one running pipeline: the workers start once and serve every configuration."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.bench.config import BenchConfig
from pipeline.bench.records import Generation, from_pipeline
from pipeline.generation import generate
from pipeline.launcher import ClusterConfig, LocalCluster, default_cores
from pipeline.scheduler import DecodeConfig
from workers.spec import WorkerSpec


@dataclass(frozen=True)
class Contender:
    """One configuration of the benchmark: how it is named and what kind of system runs it."""

    name: str
    mode: str  # target-only | serial | overlap | hf-target-only | hf-assisted
    k: int | None  # window size (None: no window, or the peer's own schedule)
    max_branches: int | None = None  # overlap: outcomes drafted ahead at most


def our_contenders(ks: tuple[int, ...], max_branches: tuple[int, ...] = (12,)) -> list[Contender]:
    contenders = [Contender("target-only", "target-only", None)]
    for k in ks:
        contenders.append(Contender(f"serial k={k}", "serial", k))
        for branches in max_branches:
            name = f"overlap k={k}" + (f" b={branches}" if len(max_branches) > 1 else "")
            contenders.append(Contender(name, "overlap", k, branches))
    return contenders


def start_cluster(config: BenchConfig, dtype: str) -> LocalCluster:
    """Both workers as `specpipe launch` starts them on a CPU: one core each, one KV slot."""
    draft_cores, target_cores = default_cores(1, 2)
    return LocalCluster(ClusterConfig(
        target=WorkerSpec("target", str(config.target_dir), "", dtype=dtype, cores=target_cores, slots=1),
        draft=WorkerSpec("draft", str(config.draft_dir), "", dtype=dtype, cores=draft_cores, slots=1),
    ))


class PipelineRunner:
    """Generates one prompt at a time through the cluster in one of our modes."""

    def __init__(self, cluster: LocalCluster, contender: Contender, new_tokens: int) -> None:
        self.cluster = cluster
        self.contender = contender
        self.decode = DecodeConfig(contender.mode, contender.k or 1, new_tokens,
                                   max_branches=contender.max_branches or DecodeConfig.max_branches)

    def __call__(self, prompt: list[int]) -> Generation:
        began = time.perf_counter()
        (sequence,), engine = generate(self.cluster.transport, [prompt], self.decode, self.cluster.limits())
        return from_pipeline(sequence, engine, time.perf_counter() - began)
