"""What `specpipe bench` runs: the concerns it shares with launch, and one field per option of its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.bench.background import BackgroundLoad
from pipeline.config import MEASURED_PROMPTS, WARMUP_PROMPTS, DecodeConfig, ModelsConfig, PromptsConfig, WorkersConfig
from workers.protocol.limits import MAX_BRANCHES

BENCH_PEERS = ("transformers", "llama.cpp")


@dataclass(frozen=True)
class BenchOutput:
    """What bench writes besides its table."""

    json_out: Path | None = None  # every figure, as JSON
    report_dir: Path | None = None  # a Markdown report with PNG plots


@dataclass(frozen=True)
class BenchConfig:
    models: ModelsConfig = ModelsConfig()
    workers: WorkersConfig = WorkersConfig()  # bench's own workers run on the CPU
    prompts: PromptsConfig = PromptsConfig(count=MEASURED_PROMPTS, warmup=WARMUP_PROMPTS)  # default: held-out
    k: tuple[int, ...] = (3,)  # window sizes: serial and overlap run once per value
    max_branches: tuple[int, ...] = (12,)  # overlap runs once per value (see DecodeConfig.max_branches)
    concurrency: tuple[int, ...] = (1,)  # prompts decoded at once: every configuration runs once per value
    max_new_tokens: int = 128
    prefill_chunk: int = DecodeConfig.prefill_chunk  # prompt tokens per target step (0 = whole prompts)
    repetitions: int = 1  # passes over the prompt set
    peers: tuple[str, ...] = BENCH_PEERS  # other engines on the same models: transformers, llama.cpp
    output: BenchOutput = BenchOutput()
    background: BackgroundLoad = BackgroundLoad()

    @property
    def concurrencies(self) -> list[int]:
        """The concurrencies to run, ascending, each once."""
        return sorted(set(self.concurrency))

    def validate(self) -> None:
        self.prompts.validate()
        self.background.validate()
        if not self.k or min(self.k) < 1:
            raise ValueError(f"--k takes window sizes of at least 1, e.g. 2,3,5; got {','.join(map(str, self.k))}")
        if not self.max_branches or not all(1 <= count <= MAX_BRANCHES for count in self.max_branches):
            raise ValueError(f"--max-branches takes counts between 1 and {MAX_BRANCHES}, e.g. 1,12; got "
                             f"{','.join(map(str, self.max_branches))}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"--concurrency takes counts of prompts decoded at once, each at least 1, e.g. 1,4,16; "
                             f"got {','.join(map(str, self.concurrency))}")
        if self.max_new_tokens < 2:
            raise ValueError(f"--max-new-tokens must be at least 2 for bench (inter-token latency needs two), got "
                             f"{self.max_new_tokens}")
        unknown = set(self.peers) - set(BENCH_PEERS)
        if unknown:
            raise ValueError(f"--peers takes {', '.join(BENCH_PEERS)} or none; got {', '.join(sorted(unknown))}")
        if self.repetitions < 1:
            raise ValueError(f"--repetitions must be at least 1, got {self.repetitions}")
