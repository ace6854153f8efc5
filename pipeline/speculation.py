"""How many tokens each sequence drafts per step: the k that maximises the batch's goodput.

One target step verifies the windows of all running sequences in one forward pass: sequence i drafts
k_i tokens (0 is a plain decode step) and the pass has R = sum(k_i + 1) rows. As in SmartSpec, the
controller picks the k_i that maximise goodput, the committed tokens the batch is expected to gain per
second of its cycle:

    goodput(k) = sum_i E(alpha_i, k_i) / cycle(k)

E is the expected commit of a window under a geometric acceptance model (each drafted token accepted
with probability alpha_i, given the ones before it were), bonus token included. The cycle is modelled
from row counts, with costs learnt online per worker (`StepCosts`):

    serial:   cycle = T_target(R) + S * T_draft(D)
    overlap:  cycle = max(T_target(R), S * T_draft(D)) + miss * S * T_draft(n)

with n the sequences that draft, S = max k_i the draft's steps, D = n (times the outcome branches drafted
ahead in overlap) the rows of one draft step, and miss the share of verifications whose next window was
not ready, which makes the target wait for a fresh draft. Drafting the j-th token of sequence i gains
alpha_i**j expected tokens, so the plan is the best prefix of all (i, j) sorted by that gain.

A draft that got slow (a busy host, a starved device) makes every plan target-only. If it would not be
at the draft's best costs seen, speculation is switched off and probed (k = 1 everywhere) every
`probe_every_s`; a probe's measurement moves the whole draft cost curve, so a recovered draft switches
speculation on again at once.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left, insort
from collections.abc import Callable
from dataclasses import dataclass

MODES = ("serial", "overlap")
PRIOR_ACCEPTANCE = 0.6  # the global acceptance rate before any verification
PRIOR_WEIGHT = 4.0  # a sequence's own rate counts once it has about this many observations
MISS_START = 0.2
MISS_SMOOTHING = 0.1
MAX_RATE = 0.999
TOO_SLOW = 1.5  # off only when a draft step costs this many times its best seen; on again once a plan drafts

WARMING_UP = "warming up"
GOODPUT = "goodput"
EXPLORING = "exploring"
DRAFT_TOO_SLOW = "draft too slow"
PROBING = "probing"
REASONS = (WARMING_UP, GOODPUT, EXPLORING, DRAFT_TOO_SLOW, PROBING)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a verification of k drafted tokens commits, bonus included: 1 + alpha + ... + alpha**k."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class StepCosts:
    """Seconds one forward pass (its round trip) of one worker costs, as a function of its row count,
    learnt while running."""

    def __init__(self, smoothing: float = 0.3) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], not {smoothing}")
        self.smoothing = smoothing
        self._rows: list[int] = []  # observed row counts, ascending
        self._seconds: dict[int, float] = {}

    def observe(self, rows: int, seconds: float) -> None:
        """Per exact row count, the first observation as is, then each one folded in by `_fold`."""
        _check(rows, seconds)
        old = self._seconds.get(rows)
        if old is None:
            insort(self._rows, rows)
            self._seconds[rows] = seconds
        else:
            self._seconds[rows] = self._fold(old, seconds)

    def _fold(self, old: float, seconds: float) -> float:
        return old + self.smoothing * (seconds - old)  # an exponential moving average

    def remeasure(self, rows: int, seconds: float) -> None:
        """A fresh measurement after the worker's speed changed: it replaces the value at `rows`, and every
        other row count's value moves by the same factor."""
        _check(rows, seconds)
        old = self.estimate(rows)
        if old is not None and old > 0.0:
            factor = seconds / old
            for count in self._rows:
                self._seconds[count] *= factor
        if rows not in self._seconds:
            insort(self._rows, rows)
        self._seconds[rows] = seconds

    def estimate(self, rows: int) -> float | None:
        """None before any observation; between observed row counts linear, below them flat, above them
        on the slope of the largest two (through the origin with one)."""
        exact = self._seconds.get(rows)
        if exact is not None:
            return exact
        counts = self._rows
        if not counts:
            return None
        i = bisect_left(counts, rows)
        if i == 0:
            return self._seconds[counts[0]]
        if i == len(counts):
            last = counts[-1]
            if len(counts) == 1:
                return self._seconds[last] * rows / last
            before = counts[-2]
            slope = max(0.0, (self._seconds[last] - self._seconds[before]) / (last - before))
            return self._seconds[last] + slope * (rows - last)
        lo, hi = counts[i - 1], counts[i]
        low = self._seconds[lo]
        return low + (self._seconds[hi] - low) * (rows - lo) / (hi - lo)

    def estimates(self, first: int, last: int) -> list[float] | None:
        """[estimate(rows) for rows in first..last], in one sweep."""
        counts = self._rows
        if not counts:
            return None
        values = [self._seconds[count] for count in counts]
        top = len(counts) - 1
        if top == 0:
            slope, end = values[0] / counts[0], 0.0
        else:
            slope = max(0.0, (values[top] - values[top - 1]) / (counts[top] - counts[top - 1]))
            end = values[top] - slope * counts[top]
        out: list[float] = []
        i = bisect_left(counts, first)
        for rows in range(first, last + 1):
            while i <= top and counts[i] < rows:
                i += 1
            if i > top:  # above the largest observed
                out.append(end + slope * rows)
            elif counts[i] == rows or i == 0:
                out.append(values[i])
            else:
                lo, hi = counts[i - 1], counts[i]
                out.append(values[i - 1] + (values[i] - values[i - 1]) * (rows - lo) / (hi - lo))
        return out

    @property
    def observed(self) -> bool:
        return bool(self._rows)


class _LowestCosts(StepCosts):
    """The lowest cost ever observed per row count."""

    def _fold(self, old: float, seconds: float) -> float:
        return min(old, seconds)


def _check(rows: int, seconds: float) -> None:
    if rows < 1:
        raise ValueError(f"a pass has at least one row, not {rows}")
    if not (seconds >= 0.0 and math.isfinite(seconds)):
        raise ValueError(f"a pass costs a finite, non-negative time, not {seconds}")


class Acceptance:
    """A sequence's per-token acceptance rate, the maximum-likelihood estimate of a geometric
    acceptance model: accepted tokens over accepted tokens plus rejections (a fully accepted window
    has no rejection)."""

    def __init__(self) -> None:
        self.accepts = 0
        self.rejections = 0

    def observe(self, drafted: int, accepted: int) -> None:
        self.accepts += accepted
        if accepted < drafted:
            self.rejections += 1

    def rate(self, prior: float, weight: float) -> float:
        """The estimate shrunk towards `prior` as if `weight` observations had given it."""
        total = self.accepts + self.rejections + weight
        value = prior if total <= 0 else (self.accepts + prior * weight) / total
        return min(MAX_RATE, max(0.0, value))


@dataclass(frozen=True)
class SpeculationPlan:
    ks: dict[int, int]  # seq_id -> tokens to draft this step (0..cap)
    tokens_per_s: float | None  # predicted goodput of this plan (None before any cost is known)
    baseline_tokens_per_s: float | None  # predicted goodput of target-only for the same sequences
    reason: str  # one of REASONS


class GoodputController:
    """Chooses k per sequence per step (at most `cap`) for the best expected goodput; see the module."""

    def __init__(self, cap: int, mode: str, *, clock: Callable[[], float] = time.perf_counter,
                 probe_every_s: float = 1.0, explore_every: int = 16,
                 on_event: Callable[[str], None] | None = None) -> None:
        if cap < 0:
            raise ValueError(f"cap must be >= 0, not {cap}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.cap = cap
        self.mode = mode
        self.clock = clock
        self.probe_every_s = probe_every_s
        self.explore_every = explore_every  # < 1: never explore
        self.on_event = on_event
        self.target = StepCosts()
        self.draft = StepCosts()
        self.draft_best: StepCosts = _LowestCosts()
        self.miss_rate = MISS_START
        self._sequences: dict[int, Acceptance] = {}
        self._all = Acceptance()
        self._explore_next = 0
        self._probe_pending = False
        self._off_since: float | None = None
        self._last_probe = 0.0
        # summary
        self._plans = 0
        self._pairs = 0
        self._k_total = 0
        self._zero_pairs = 0
        self._off_events = 0
        self._off_total_s = 0.0
        self._reasons: dict[str, int] = {}
        self._last_plan_at: float | None = None
        self._last_ratio: float | None = None
        self._ratio_weighted = 0.0
        self._ratio_time = 0.0
        self._ratio_sum = 0.0
        self._ratio_count = 0

    # --- observations

    def observe_target(self, rows: int, seconds: float) -> None:
        """One target batch pass: its rows and round-trip seconds."""
        if rows >= 1 and seconds >= 0.0 and math.isfinite(seconds):
            self.target.observe(rows, seconds)

    def observe_draft(self, rows_per_step: float, steps: int, seconds: float) -> None:
        """One draft batch request: `steps` forward passes of about `rows_per_step` rows each."""
        if steps < 1 or rows_per_step <= 0 or not (seconds >= 0.0 and math.isfinite(seconds)):
            return
        rows = max(1, round(rows_per_step))
        per_step = seconds / steps
        if self._probe_pending:
            self._probe_pending = False
            self.draft.remeasure(rows, per_step)
        else:
            self.draft.observe(rows, per_step)
        self.draft_best.observe(rows, per_step)

    def observe_acceptance(self, seq_id: int, drafted: int, accepted: int) -> None:
        acceptance = self._sequences.get(seq_id)
        if acceptance is None:
            acceptance = self._sequences[seq_id] = Acceptance()
        acceptance.observe(drafted, accepted)
        self._all.observe(drafted, accepted)

    def observe_predraft(self, hit: bool) -> None:
        """Overlap: whether the next window was ready when the verification came back."""
        self.miss_rate += MISS_SMOOTHING * ((0.0 if hit else 1.0) - self.miss_rate)

    def forget(self, seq_id: int) -> None:
        self._sequences.pop(seq_id, None)

    # --- the model

    def _alphas(self, seq_ids: list[int]) -> list[float]:
        prior = self._all.rate(PRIOR_ACCEPTANCE, 0.0)  # over all observations so far
        fresh = Acceptance()
        return [self._sequences.get(seq_id, fresh).rate(prior, PRIOR_WEIGHT) for seq_id in seq_ids]

    def _cycle(self, rows: int, drafting: int, steps: int, branches: int, draft: StepCosts) -> float | None:
        """Seconds of one step: `rows` target rows, `drafting` sequences drafting `steps` steps."""
        target = self.target.estimate(rows)
        if target is None:
            return None
        if steps == 0:
            return max(target, 1e-12)
        per_step = draft.estimate(drafting * (branches if self.mode == "overlap" else 1))
        if per_step is None:
            return None
        if self.mode == "serial":
            return max(target + steps * per_step, 1e-12)
        fresh = draft.estimate(drafting)
        assert fresh is not None
        return max(max(target, steps * per_step) + self.miss_rate * steps * fresh, 1e-12)

    def _goodput(self, ks: list[int], alphas: list[float], branches: int, draft: StepCosts) -> float | None:
        drafting = sum(1 for k in ks if k > 0)
        cycle = self._cycle(sum(ks) + len(ks), drafting, max(ks, default=0), branches, draft)
        if cycle is None:
            return None
        return sum(expected_tokens(alpha, k) for alpha, k in zip(alphas, ks)) / cycle

    def evaluate(self, ks: dict[int, int], branches: int = 1) -> float | None:
        """Predicted goodput (tokens/s) of any plan; None while a cost it needs is unknown."""
        if not ks:
            return None
        seq_ids = list(ks)
        return self._goodput([max(0, ks[s]) for s in seq_ids], self._alphas(seq_ids), branches, self.draft)

    def _order(self, alphas: list[float]) -> list[tuple[float, int, int]]:
        """All (-alpha_i**j, j, i), j = 1..cap, by marginal gain alpha_i**j: likeliest first; ties: the
        sequence with fewer drafted so far first."""
        gains: list[tuple[float, int, int]] = []
        for index, alpha in enumerate(alphas):
            gain = 1.0
            for j in range(1, self.cap + 1):
                gain *= alpha
                gains.append((-gain, j, index))
        gains.sort()
        return gains

    def _best(self, gains: list[tuple[float, int, int]], n: int, target_costs: list[float], branches: int,
              draft: StepCosts) -> list[int]:
        """The ks of the best prefix of `gains`, given target_costs[r] for n + r rows."""
        overlap = self.mode == "overlap"
        width = branches if overlap else 1
        step_costs = [draft.estimate(count * width) or 0.0 for count in range(n + 1)]
        fresh_costs = [draft.estimate(count) or 0.0 for count in range(n + 1)] if overlap else step_costs
        miss = self.miss_rate

        tokens = float(n)
        best, best_length = tokens / max(target_costs[0], 1e-12), 0
        drafting = steps = 0
        for length, (negative_gain, j, _) in enumerate(gains, start=1):
            tokens -= negative_gain
            if j == 1:
                drafting += 1
            if j > steps:
                steps = j
            t_target = target_costs[length]
            t_draft = steps * step_costs[drafting]
            if overlap:
                cycle = max(t_target, t_draft) + miss * steps * fresh_costs[drafting]
            else:
                cycle = t_target + t_draft
            goodput = tokens / max(cycle, 1e-12)
            if goodput > best * (1.0 + 1e-12):  # ties: fewer drafted tokens
                best, best_length = goodput, length
        ks = [0] * n
        for _, _, index in gains[:best_length]:
            ks[index] += 1
        return ks

    # --- planning

    def plan(self, seq_ids: list[int], branches: int = 1) -> SpeculationPlan:
        """k per sequence for this step. `branches`: overlap drafts ahead that many outcome branches per
        sequence, each a draft row per drafted token."""
        seq_ids = list(dict.fromkeys(seq_ids))
        if not seq_ids:
            return SpeculationPlan({}, None, None, GOODPUT)
        now = self.clock()
        self._plans += 1
        n, cap = len(seq_ids), self.cap
        alphas = self._alphas(seq_ids)
        if not self.target.observed or (cap > 0 and not self.draft.observed):
            return self._record(seq_ids, [cap] * n, alphas, branches, WARMING_UP, now)
        if self._off_since is not None and now - self._last_probe >= self.probe_every_s:
            self._last_probe = now
            self._probe_pending = True
            return self._record(seq_ids, [min(1, cap)] * n, alphas, branches, PROBING, now)
        if self._off_since is None and self.explore_every >= 1 and self._plans % self.explore_every == 0:
            k = self._explore_next
            self._explore_next = (k + 1) % (cap + 1)
            return self._record(seq_ids, [k] * n, alphas, branches, EXPLORING, now)

        gains = self._order(alphas)
        target_costs = self.target.estimates(n, n * (cap + 1))
        assert target_costs is not None
        ks = self._best(gains, n, target_costs, branches, self.draft)
        if cap > 0 and not any(ks):
            at_best = self._best(gains, n, target_costs, branches, self.draft_best)
            drafting, cost, lowest = self._draft_step(at_best, branches)
            if drafting:
                if self._off_since is not None or cost >= TOO_SLOW * lowest:
                    if self._off_since is None:
                        self._off_since = self._last_probe = now
                        self._off_events += 1
                        self._event(f"speculation off: a draft step costs {cost * 1e3:.1f} ms at {drafting} "
                                    f"rows (at best {lowest * 1e3:.1f} ms); drafting no longer pays")
                    return self._record(seq_ids, ks, alphas, branches, DRAFT_TOO_SLOW, now)
        if self._off_since is not None:
            self._off_total_s += now - self._off_since
            self._off_since = None
            self._probe_pending = False
            drafting, cost, lowest = self._draft_step(ks, branches, at_least=1)
            self._event(f"speculation on again: a draft step costs {cost * 1e3:.1f} ms at {drafting} rows "
                        f"(at best {lowest * 1e3:.1f} ms)")
        return self._record(seq_ids, ks, alphas, branches, GOODPUT, now)

    def _draft_step(self, ks: list[int], branches: int, at_least: int = 0) -> tuple[int, float, float]:
        """The rows of one draft step of plan `ks`, and what such a step costs now and at best seen."""
        drafting = max(at_least, sum(1 for k in ks if k > 0) * (branches if self.mode == "overlap" else 1))
        return drafting, self.draft.estimate(drafting) or 0.0, self.draft_best.estimate(drafting) or 0.0

    def _event(self, line: str) -> None:
        if self.on_event is not None:
            self.on_event(line)

    def _record(self, seq_ids: list[int], ks: list[int], alphas: list[float], branches: int, reason: str,
                now: float) -> SpeculationPlan:
        tokens_per_s = self._goodput(ks, alphas, branches, self.draft)
        baseline = self._goodput([0] * len(ks), alphas, branches, self.draft)
        self._pairs += len(ks)
        self._k_total += sum(ks)
        self._zero_pairs += sum(1 for k in ks if k == 0)
        self._reasons[reason] = self._reasons.get(reason, 0) + 1
        self._close_ratio(now)
        self._last_ratio = None
        if tokens_per_s is not None and baseline:
            self._last_ratio = tokens_per_s / baseline
            self._ratio_sum += self._last_ratio
            self._ratio_count += 1
        return SpeculationPlan(dict(zip(seq_ids, ks)), tokens_per_s, baseline, reason)

    def _close_ratio(self, now: float) -> None:
        """Weights the last plan's predicted speedup by the time until `now`."""
        if self._last_plan_at is not None and self._last_ratio is not None:
            elapsed = max(0.0, now - self._last_plan_at)
            self._ratio_weighted += elapsed * self._last_ratio
            self._ratio_time += elapsed
        self._last_plan_at = now

    def summary(self) -> dict[str, object]:
        now = self.clock()
        weighted, weight = self._ratio_weighted, self._ratio_time
        if self._last_plan_at is not None and self._last_ratio is not None:
            elapsed = max(0.0, now - self._last_plan_at)
            weighted += elapsed * self._last_ratio
            weight += elapsed
        if weight > 0:
            speedup: float | None = weighted / weight
        else:  # no time passed between plans (a stopped clock): every plan weighs the same
            speedup = self._ratio_sum / self._ratio_count if self._ratio_count else None
        off_s = self._off_total_s + (now - self._off_since if self._off_since is not None else 0.0)
        return {
            "plans": self._plans,
            "mean_k": self._k_total / self._pairs if self._pairs else 0.0,
            "zero_k_share": self._zero_pairs / self._pairs if self._pairs else 0.0,
            "speculation_off_events": self._off_events,
            "speculation_off_s": off_s,
            "predicted_speedup": speedup,
            "reasons": dict(self._reasons),
        }
