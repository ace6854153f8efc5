"""What the draft proposed, and the outcomes of a verification that overlap drafts ahead for.

While the target verifies a window, overlap mode drafts the next window for the likeliest outcomes
of that verification at once (pre-speculating outcomes, as SSD/Saguaro do): "all accepted, and the
target's bonus token is one of the draft's top guesses", and "rejected at position j, corrected to
one of the draft's runner-up tokens there". A `Verification` holds what was drafted ahead for it,
and `resolve` says, in one place, what the verification's outcome makes of it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import Tensor

MAX_BONUS_GUESSES = 4  # guesses at the one token of a plain decode step


@dataclass(frozen=True)
class Drafted:
    """Drafted tokens with what the target needs to judge them."""

    tokens: list[int]
    probs: Tensor | None  # [len(tokens), vocab] the draft's distributions (sampling only)
    alternatives: list[list[int]]  # the draft's next choices at each position, likeliest first

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, count: int) -> Drafted:
        return Drafted(self.tokens[:count], None if self.probs is None else self.probs[:count],
                       self.alternatives[:count])


EMPTY = Drafted([], None, [])  # no proposal: a plain decode (or prefill) step


@dataclass(frozen=True)
class Outcomes:
    """The outcomes one round of drafting ahead is for: rejections (fork position, corrected token),
    then `bonus_guesses` guesses of the bonus token after the whole window."""

    context: list[int]  # committed tokens + the window being verified
    forks: list[int]
    heads: list[int]
    bonus_guesses: int

    @property
    def branches(self) -> int:
        return len(self.heads) + self.bonus_guesses


def likeliest_outcomes(window: Drafted, committed: int, budget: int) -> tuple[list[tuple[int, int]], int]:
    """Up to `budget` outcomes of verifying `window` after `committed` tokens, likeliest first:
    all accepted with the draft's top bonus guess; then rejected at each position j with the draft's
    runner-up there; the second bonus guess; third choices at each j; and so on. Returns the
    rejections as (fork position, token) and the number of bonus guesses."""
    if not any(window.alternatives):  # a plain decode (or prefill) step: its one token is the bonus
        return [], min(budget, MAX_BONUS_GUESSES)
    rejections: list[tuple[int, int]] = []
    bonus = 1
    rank = 0
    while bonus + len(rejections) < budget:
        level = [(committed + j, choices[rank]) for j, choices in enumerate(window.alternatives)
                 if rank < len(choices)]
        if not level:
            break
        rejections += level[: budget - bonus - len(rejections)]
        if bonus + len(rejections) < budget:
            bonus += 1
        rank += 1
    return rejections, bonus


@dataclass
class BranchBudget:
    """How many outcomes one round of drafting ahead covers, learnt as it runs: one more after a round
    that finished before its verification, two fewer after one that outlasted it."""

    cap: int  # --max-branches
    value: int = 4

    def __post_init__(self) -> None:
        self.value = min(self.value, self.cap)

    def finished_in_time(self) -> None:
        self.value = min(self.cap, self.value + 1)

    def outlasted(self) -> None:
        self.value = max(1, self.value - 2)


@dataclass(frozen=True)
class Branch:
    """A window drafted ahead for one outcome of a verification."""

    context: list[int]  # the committed tokens this outcome leads to
    drafted: Drafted
    after_rejection: bool  # the outcome is a rejected token (not all accepted plus a bonus)


@dataclass(frozen=True)
class Chain:
    """The windows sent behind a verification in one VerifyNext, so that the target goes on with the one
    for the outcome it finds, without the coordinator in between."""

    request_id: int | None  # None: no outcome could go on by itself, so nothing was sent
    windows: dict[tuple[int, int], tuple[Branch, Drafted]]  # (accepted, next token) -> its branch and the window sent


@dataclass
class DraftAhead:
    """One SpeculateRequest's drafting ahead for the outcomes of one verification."""

    request_id: int
    outcomes: Outcomes
    branches: list[Branch] | None = None  # None while the draft is still at it
    chain: Chain | None = None  # once decided: what went to the target behind the verification


@dataclass
class Verification:
    """One verification at the target, and what was drafted ahead for its outcomes."""

    request_id: int
    window: Drafted  # EMPTY for a plain decode step
    ahead: DraftAhead | None = None


class Resolution(enum.Enum):
    NOT_DRAFTED_AHEAD = "not drafted ahead"
    PENDING = "pending"  # the drafting ahead is still at the draft: resolve again when it returns
    CHAINED = "chained"  # a hit, and the target already verifies its window (the VerifyNext)
    HIT = "hit"  # a hit: its window goes to the target next
    MISS = "miss"  # no branch drafted ahead was the outcome (a VerifyNext sent behind is Skipped)


@dataclass(frozen=True)
class Resolved:
    how: Resolution
    branch: Branch | None = None  # HIT and CHAINED
    window: Drafted | None = None  # CHAINED: the window the target now verifies


def resolve(verification: Verification, committed: list[int]) -> Resolved:
    """What the verification's outcome (the tokens `committed` now) makes of what was drafted ahead for it.

    The branch whose context equals the committed tokens is the hit. When a VerifyNext went behind the
    verification, the target has gone on with the hit's window if it was among those sent (the target
    matches the outcome by (accepted, next token), which names the same branch); otherwise it skips."""
    ahead = verification.ahead
    if ahead is None:
        return Resolved(Resolution.NOT_DRAFTED_AHEAD)
    if ahead.branches is None:
        return Resolved(Resolution.PENDING)
    hit = next((branch for branch in ahead.branches if branch.context == committed), None)
    if ahead.chain is not None and ahead.chain.request_id is not None:
        chained = next((window for branch, window in ahead.chain.windows.values() if branch is hit), None)
        if hit is None or chained is None:
            return Resolved(Resolution.MISS)
        return Resolved(Resolution.CHAINED, hit, chained)
    if hit is None:
        return Resolved(Resolution.MISS)
    return Resolved(Resolution.HIT, hit)
