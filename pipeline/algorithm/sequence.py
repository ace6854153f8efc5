"""One sequence as the scheduler sees it: its tokens, where it stands (a named phase), its statistics.

    WAITING ──admit──▶ READY ──VerifyRequest──▶ VERIFYING ──VerifyResult──▶ resolve the outcome:
                        ▲ ▲                                                 ├─ hit ─────────────▶ READY (the window drafted ahead)
                        │ │                     VERIFYING ◀─────────────────┼─ hit, chained (the target went on by itself)
                        │ │                                                 ├─ pending ─────────▶ AWAITING_AHEAD
                        │ └─────────────────────────────────────────────────┼─ target-only, or no room to draft: READY (EMPTY)
                        └─DraftResult─ DRAFTING ◀─DraftRequest─ DRAFT_NEEDED ◀─ miss, serial, nothing drafted ahead
    AWAITING_AHEAD ──SpeculateResult──▶ resolve the outcome (hit or miss, as above)
    READY ──PrefillChunk──▶ PREFILLING ──Prefilled──▶ READY (a long prompt, one chunk per step; the last is a VerifyRequest)
    any phase ──EOS, length, cancel or a worker's error──▶ FINISHED (replies still in flight only settle the cache mirrors)

READY holds a window for the target; EMPTY is a plain decode step, which is also how a prompt is
prefilled and every target-only step runs. In overlap mode the draft drafts ahead for a VERIFYING
sequence's likeliest outcomes (pipeline.algorithm.drafting); `Scheduler._after_verification` is the one place
an outcome decides the next phase.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pipeline.algorithm.drafting import Drafted, Verification
from workers.sampling import SamplingParams


class Phase(enum.Enum):
    WAITING = "waiting"  # added, not admitted yet (more sequences than --concurrency)
    PREFILLING = "prefilling"  # a chunk of its prompt (not the last) is at the target
    READY = "ready"  # a window (maybe EMPTY) awaits the target
    VERIFYING = "verifying"  # a verification is at the target; overlap may draft ahead beside it
    AWAITING_AHEAD = "awaiting ahead"  # verified; what was drafted ahead for its outcome is still at the draft
    DRAFT_NEEDED = "draft needed"  # the draft must draft a window for the committed tokens
    DRAFTING = "drafting"  # that DraftRequest is at the draft
    FINISHED = "finished"  # EOS, length or cancelled; replies still in flight are dropped


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, by slice comparisons (C speed) and bisection."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n  # the usual case: one extends the other
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


@dataclass
class CacheMirror:
    """The token ids whose keys and values one worker holds for one sequence, as the coordinator knows them,
    so that every request says exactly where to roll back to and what to read."""

    role: str
    tokens: list[int] = field(default_factory=list)

    def feed(self, context: list[int]) -> tuple[int, list[int]]:
        """Where the worker must roll back to for `context`, and what it must read from there. The mirror
        takes the whole context until the reply says how much of it the cache keeps."""
        start = min(common_prefix(self.tokens, context), len(context) - 1)
        feed = context[start:]
        self.tokens = self.tokens[:start] + feed
        return start, feed

    def extend(self, tokens: list[int]) -> None:
        self.tokens = self.tokens + tokens

    def settle(self, cached: int, seq_id: int) -> None:
        """The worker says its cache holds `cached` positions; they must all be ones we sent."""
        if cached > len(self.tokens):
            raise RuntimeError(f"{self.role} cache of sequence {seq_id} holds {cached} positions, expected at most "
                               f"{len(self.tokens)}")
        self.tokens = self.tokens[:cached]


@dataclass
class SequenceStats:
    drafted: int = 0  # drafted tokens sent for verification
    accepted: int = 0
    verifications: int = 0  # verifications that carried at least one drafted token
    plain_steps: int = 0  # target steps after the prefill that carried no drafted token (k = 0, or no draft)
    predraft_hits: int = 0  # verifications whose next window was ready (drafted ahead)
    predraft_misses: int = 0
    alt_hits: int = 0  # of the hits, those served by a rejected-at-j branch
    speculated_branches: list[int] = field(default_factory=list)  # outcomes drafted ahead, per verification
    accepted_lengths: list[int] = field(default_factory=list)  # per verification with a window
    window_sizes: list[int] = field(default_factory=list)
    started: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each generated token was committed


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    tokens: list[int]  # prompt + committed generated tokens
    max_new_tokens: int
    k: int  # this sequence's current window size (the configured k unless adapting)
    sampling: SamplingParams = SamplingParams()  # its own: a server's requests each bring theirs
    phase: Phase = Phase.WAITING
    window: Drafted | None = None  # READY: what the target verifies next
    verification: Verification | None = None  # VERIFYING, AWAITING_AHEAD: the one at the target, or just back
    draft_cache: CacheMirror = field(default_factory=lambda: CacheMirror("draft"))
    target_cache: CacheMirror = field(default_factory=lambda: CacheMirror("target"))
    finish_reason: str | None = None  # "eos", "length", "cancelled" or "error"
    error: str | None = None  # what a worker said when it could not serve this sequence
    stats: SequenceStats = field(default_factory=SequenceStats)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]
