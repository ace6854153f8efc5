"""What a user asks of the pipeline: frozen dataclasses, one per concern, one field per CLI option.

`pipeline.options` defines each option once and maps it to its field here; commands build these
objects and pass them down whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.protocol.limits import MAX_BRANCHES
from workers.sampling import SamplingParams

MODES = ("overlap", "serial", "target-only")


@dataclass(frozen=True)
class DecodeConfig:
    """How sequences are decoded (the scheduler's settings)."""

    mode: str = "overlap"
    k: int = 3
    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    # Adapt each sequence's window between 1 and k: one longer after a fully accepted window, down
    # to accepted + 1 after a rejection (the schedule of transformers' assisted generation, PEARL's
    # adaptive draft length in spirit).
    adaptive_k: bool = False
    # Overlap: at most this many branches (outcomes of a verification) drafted ahead per window;
    # 1 is the classic optimistic pre-draft (all accepted, the bonus guessed by the draft's argmax).
    max_branches: int = 12

    def validate(self, max_context: int) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; --mode takes one of {', '.join(MODES)}")
        if not 1 <= self.k < max_context:
            raise ValueError(f"--k must be between 1 and {max_context - 1} (the context), got {self.k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not 1 <= self.max_branches <= MAX_BRANCHES:
            raise ValueError(f"--max-branches must be between 1 and {MAX_BRANCHES}, got {self.max_branches}")
        self.sampling.validate()

    @property
    def uses_draft(self) -> bool:
        return self.mode != "target-only"
