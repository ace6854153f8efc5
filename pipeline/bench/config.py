"""What `specpipe bench` runs: one field per command-line option."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.models import DRAFT_DIR, HELDOUT_PROMPTS, TARGET_DIR


@dataclass(frozen=True)
class BenchConfig:
    draft_dir: Path = DRAFT_DIR
    target_dir: Path = TARGET_DIR
    prompts_file: Path = HELDOUT_PROMPTS  # one JSON string per line; default: held-out code prompts
    prompts: int = 8  # how many of them (after the warm-up ones)
    ks: tuple[int, ...] = (2, 3, 5)  # window sizes for serial and overlap
    max_branches: tuple[int, ...] = (12,)  # overlap runs once per value (see DecodeConfig.max_branches)
    new_tokens: int = 128
    repetitions: int = 1  # passes over the prompt set
    warmup: int = 1  # prompts per configuration run first and not counted
    peers: bool = True  # also run transformers generate and assisted generation
    dtype: str = "auto"  # our workers' --dtype (auto: fp16-weights on an AVX2 CPU)
    json_path: Path | None = None
    report_dir: Path | None = None

    def validate(self) -> None:
        if self.prompts < 1:
            raise ValueError(f"--prompts must be at least 1, got {self.prompts}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"--k takes window sizes of at least 1, e.g. 2,4,8; got {self.ks}")
        if not self.max_branches or min(self.max_branches) < 1:
            raise ValueError(f"--max-branches takes counts of at least 1, e.g. 1,12; got {self.max_branches}")
        if self.new_tokens < 2:
            raise ValueError(f"--new-tokens must be at least 2 (inter-token latency needs two), got {self.new_tokens}")
        if self.repetitions < 1:
            raise ValueError(f"--repetitions must be at least 1, got {self.repetitions}")
        if self.warmup < 0:
            raise ValueError(f"--warmup cannot be negative, got {self.warmup}")
