"""What `specpipe distill` is asked for, one frozen dataclass per concern."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import MEASURED_PROMPTS, ModelsConfig, PromptsConfig

EVAL_WINDOWS = (1, 3, 5)  # the k at which the evaluation reports mean acceptance length
HEAD_DIM = 64


@dataclass(frozen=True)
class DraftShape:
    """The draft's decoder: --layers and --width; heads, KV heads and FFN width follow from the width."""

    layers: int = 2
    width: int = 256

    @property
    def heads(self) -> int:
        return max(1, self.width // HEAD_DIM)

    @property
    def kv_heads(self) -> int:
        return max(1, self.heads // 2)  # grouped-query attention, two query heads per KV head

    @property
    def ffn(self) -> int:
        return max(32, round(self.width * 2.75 / 32) * 32)  # SwiGLU at ~8/3 of the width, as Llama

    def validate(self) -> None:
        if self.layers < 1:
            raise ValueError(f"--layers must be at least 1, got {self.layers}")
        if self.width < 16 or self.width % 16:
            raise ValueError(f"--width must be a multiple of 16 and at least 16, got {self.width}")
        if self.width > HEAD_DIM and self.width % HEAD_DIM:
            raise ValueError(f"--width above {HEAD_DIM} must be a multiple of {HEAD_DIM} (the head size), "
                             f"got {self.width}")


@dataclass(frozen=True)
class TrainingConfig:
    """How long and on what the draft trains."""

    steps: int | None = None  # --steps; None: as many as --minutes allows
    minutes: float | None = None  # --minutes; with neither given, DEFAULT_MINUTES
    batch_size: int = 16
    seq_len: int = 512
    learning_rate: float = 2e-3
    generations: int = 256  # continuations the target writes for the draft to learn on
    seed: int = 1234

    DEFAULT_MINUTES = 30.0

    @property
    def time_budget_minutes(self) -> float | None:
        if self.minutes is None and self.steps is None:
            return self.DEFAULT_MINUTES
        return self.minutes

    def validate(self) -> None:
        if self.steps is not None and self.minutes is not None:
            raise ValueError("give --steps or --minutes, not both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"--minutes must be above 0, got {self.minutes}")
        for name, value in (("--batch-size", self.batch_size), ("--seq-len", self.seq_len)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.generations < 0:
            raise ValueError(f"--generations cannot be negative, got {self.generations}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"--learning-rate must lie in (0, 1), got {self.learning_rate}")


@dataclass(frozen=True)
class EvalConfig:
    """The pair's evaluation: greedy target continuations of held-out prompts, and the draft against them."""

    prompts: PromptsConfig = PromptsConfig(count=MEASURED_PROMPTS)  # default: the bundled held-out code prompts
    max_new_tokens: int = 128
    windows: tuple[int, ...] = EVAL_WINDOWS  # --eval-k: the k at which mean acceptance length is reported


@dataclass(frozen=True)
class DistillConfig:
    """Everything `specpipe distill` is asked for."""

    models: ModelsConfig = ModelsConfig()  # --target distils for it; --draft is what --eval-only evaluates
    out_dir: Path | None = None  # --out: the draft checkpoint, and its resumable state under state/
    corpus: tuple[Path, ...] = ()  # --corpus: directories of *.py files (none: the Python standard library)
    init_dir: Path | None = None  # --init: start from this draft (grown to --layers if that is more)
    shape: DraftShape = DraftShape()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    eval_only: bool = False
    json_out: Path | None = None

    def validate(self) -> None:
        if not self.eval_only and self.out_dir is None:
            raise ValueError("--out is required: the directory the draft checkpoint goes to (or pass --eval-only)")
        self.shape.validate()
        self.training.validate()
        self.evaluation.prompts.validate()
        if not self.evaluation.windows or min(self.evaluation.windows) < 1:
            raise ValueError(f"--eval-k must list windows of at least 1 token, got {self.evaluation.windows}")
        if self.evaluation.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.evaluation.max_new_tokens}")
        for directory in self.corpus:
            if not directory.is_dir():
                raise ValueError(f"--corpus {directory} is not a directory")
