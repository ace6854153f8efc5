"""How many tokens each sequence drafts per step: the k that maximises the batch's goodput.

One target pass verifies the windows of the sequences that are ready, beside up to --prefill-chunk prompt
rows: sequence i drafts k_i tokens (0 is a plain decode step), its window is k_i + 1 rows. As in SmartSpec,
the controller picks the k_i that maximise goodput, the committed tokens per second:

    E(alpha, k) = 1 + alpha + ... + alpha**k

is the expected commit of a window under a geometric acceptance model (each drafted token accepted with
probability alpha_i given the ones before it were), bonus token included.

Costs. T(R), the seconds of a target pass of R rows, and T_d(D), of a draft step of D rows, are learnt
online from the round trips (`StepCosts`): per row count a moving average, then a non-decreasing fit
(isotonic regression, so a noisy spell at one row count never makes the rows past it look free), linear
between the row counts seen and on the slope of the fit's upper half above them. No shape is assumed: on
the CPU kernels a pass costs about the same up to the register block of rows (6, on AVX-512 and AVX2)
and then a fixed time per row (past the block the products are bound by FMAs, not by reading the weights),
and the fit follows both pieces. Below the fewest rows seen (early on, only prompt chunks of 30 to 64 rows
and more) T is the line from the origin to it, a lower bound (a pass's fixed cost is never negative): the
fixed cost cannot be told from passes that many rows long (it is a few percent of them, and a noisy one),
so until a pass as small is measured the controller errs towards target-only, whose row count its plans
then measure. (A flat guess, the old one, made target-only's tokens look as dear as a prompt chunk's pass
and every drafted row free: predicted 1.3-2.2x in passes where prompt rows left nothing to gain.)

Split passes. A drafting sequence's next window is not always ready when its verification comes back: in
serial mode never (it is drafted after), in overlap when no window drafted ahead fits the outcome (a miss,
rate m, learnt). It needs a fresh draft first; f = 1 (serial) or m (overlap) is that chance, 0 at k = 0.
If any other sequence is ready the target does not wait: it runs a pass without this one, which joins the
next pass (it skips one). Only when no sequence is ready does the target wait for the fresh draft,
F = S * T_d(n_d). With z sequences at k = 0, n_d drafting, n = z + n_d and S = max k_i the draft's steps:

    skip = f                       if z > 0       the chance a drafting sequence misses the next pass
         = f * (1 - f**(n - 1))    if z = 0       (alone, it never misses one: the target waits for it)
    p    = 1 / (1 + skip)                         the share of passes a drafting sequence is in
    Q    = f**n if z = 0 else 0                   the chance the target waits for the draft

and per pass, in expectation,

    rows    R   = z + p * sum_drafting (k_i + 1)
    tokens  E   = z + p * sum_drafting E(alpha_i, k_i)
    time    tau = max(T(R + P), D) + Q * F

with P the prompt rows in the pass and D the draft's work in the meantime (it must keep up): S steps of
the present sequences' rows, p * n_d * (B + skip) rows a step in overlap (B outcome branches drafted ahead
for each, and the misses' fresh windows), p * n_d * skip in serial. For one sequence this is the familiar
cycle: serial T(k + 1) + S * T_d(1); overlap max(T(k + 1), S * T_d(B)) + m * S * T_d(1).

Prompt rows cost a pass the same whatever is drafted: t_P = T(n + P) - T(n) is theirs. The controller
maximises the decode goodput E / (tau - t_P), which target-only (every k = 0) predicts as n / T(n), and
drafts only if it predicts MIN_GAIN (10 %) more than that (what the model leaves out: measured against
predicted ran 0.86-1.08 at concurrency 4 on the 2-vCPU EPYC, where a drafted row costs about what it gains); the
j-th drafted token of sequence i gains alpha_i**j, so the plan is the best prefix of all (i, j) sorted by
that gain (every prefix evaluated). The pass's speedup over target-only, the time target-only would take
for the same work (the prompt rows and E tokens) over tau,

    speedup = (t_P + E * T(n) / n) / tau,

time-weighted over the run, is the predicted speedup of `summary()` (bench compares it with the measured
tokens/s against target-only). A pass of prompt rows alone, with nothing decoding, is 1.

Exploring. Every `explore_every`-th plan one drafting sequence (in turn) takes another k (cycling 0..cap),
so costs near the plan's row counts stay measured, at the price of one window: a uniform k for all would
cost a whole pass of several times the rows, and sequences at k = 0 sent drafting would each wait for the
draft to read what it missed (see Starting; at concurrency 4 that is several passes of ~10 ms each, and
explored every 16 plans it cost ~8 % of the tokens). A sequence at k = 0 is taken at the acceptance of all
sequences so far. While plans draft and target-only's pass (n rows) is below every row count measured, the
exploration is a target-only pass instead: T(n) is what every speedup is against. A plan that drafts nothing
explores too: one sequence (in turn) drafts a token where it would draft at the acceptance of all sequences,
so that a sequence whose first windows were unlucky is measured again instead of left at k = 0 to its end
(at concurrency 1, 29 % of the plans were such).

Starting. A sequence that did not draft in its last plan starts drafting alone (one a plan, the likeliest):
the draft must first read what it missed, a whole prompt if it never drafted, and meanwhile the sequence
misses passes; several starting at once could leave the target with nothing ready.

A draft that got slow (a busy host, a starved device) makes every plan target-only. If it would not be
at the draft's best costs seen, speculation is switched off and probed (k = 1 everywhere) every
`probe_every_s`; a probe's measurement moves the whole draft cost curve, so a recovered draft switches
speculation on again at once.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable
from dataclasses import dataclass

MODES = ("serial", "overlap")
PRIOR_ACCEPTANCE = 0.6  # the global acceptance rate before any verification
PRIOR_WEIGHT = 4.0  # a sequence's own rate counts once it has about this many observations
MISS_START = 0.2
MISS_SMOOTHING = 0.1
MAX_RATE = 0.999
TOO_SLOW = 1.5  # off only when a draft step costs this many times its best seen; on again once a plan drafts
FIT_WEIGHT_CAP = 8  # in the fit, a row count's average weighs as its observations, at most this many
# a plan drafts only if it beats target-only by this much: what the model leaves out costs up to ~14 % where
# drafting is near break-even (a sequence that starts drafting waits for the draft to read what it missed; the
# draft shares the coordinator's core; see the module)
MIN_GAIN = 1.10

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


def isotonic(values: list[float], weights: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in weighted least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for value, weight in zip(values, weights):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, weight_, length = blocks.pop()
            last = blocks[-1]
            total = last[1] + weight_
            last[0] = (last[0] * last[1] + mean * weight_) / total
            last[1], last[2] = total, last[2] + length
    out: list[float] = []
    for mean, _, length in blocks:
        out.extend([mean] * int(length))
    return out


class StepCosts:
    """Seconds one forward pass (its round trip) of one worker costs, as a function of its row count,
    learnt while running: per row count the observations averaged, then fitted non-decreasing (see the
    module)."""

    def __init__(self, smoothing: float = 0.3) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], not {smoothing}")
        self.smoothing = smoothing
        self._rows: list[int] = []  # observed row counts, ascending
        self._seconds: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._fit: tuple[list[int], list[float], float] | None = None  # row counts, fitted seconds, slope above
        self.version = 0  # counts the changes

    def observe(self, rows: int, seconds: float) -> None:
        """Per exact row count, the first observation as is, then each one folded in by `_fold`."""
        _check(rows, seconds)
        old = self._seconds.get(rows)
        if old is None:
            insort(self._rows, rows)
            self._seconds[rows] = seconds
            self._count[rows] = 1
        else:
            self._seconds[rows] = self._fold(old, seconds)
            self._count[rows] += 1
        self._fit = None
        self.version += 1

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
        self._count[rows] = 1
        self._fit = None
        self.version += 1

    def _fitted(self) -> tuple[list[int], list[float], float]:
        if self._fit is None:
            counts = self._rows
            values = isotonic([self._seconds[c] for c in counts],
                              [min(FIT_WEIGHT_CAP, self._count.get(c, 1)) for c in counts])
            if len(counts) == 1:
                above = values[0] / counts[0]  # one point: through the origin
            else:  # least squares over the upper half of the row counts seen (two at least)
                first = min(bisect_left(counts, counts[-1] / 2), len(counts) - 2)
                above = _slope(counts[first:], values[first:])
            self._fit = (counts, values, above)
        return self._fit

    def estimate(self, rows: float) -> float | None:
        """None before any observation; otherwise the fit: linear between observed row counts, above them on the
        slope of its upper half (through the origin with one point), below them on the line from the origin
        to the fewest rows' cost. `rows` may be fractional (the expected rows of a pass)."""
        return self.curve()(rows) if self._rows else None

    def curve(self) -> Callable[[float], float]:
        """`estimate` as a function of the fit as it is now (for many estimates in a row); observed only."""
        counts, values, above = self._fitted()
        low, high, bottom, top = counts[0], counts[-1], values[0], values[-1]

        def seconds(rows: float) -> float:
            if rows <= low:  # the line from the origin: a lower bound (see the module)
                return bottom * rows / low
            if rows >= high:
                return top + above * (rows - high)
            i = bisect_right(counts, rows)
            lo, hi = counts[i - 1], counts[i]
            return values[i - 1] + (values[i] - values[i - 1]) * (rows - lo) / (hi - lo)

        return seconds

    @property
    def observed(self) -> bool:
        return bool(self._rows)

    @property
    def fewest(self) -> int:
        """The fewest rows observed (0 before any observation)."""
        return self._rows[0] if self._rows else 0


class _LowestCosts(StepCosts):
    """The lowest cost ever observed per row count."""

    def _fold(self, old: float, seconds: float) -> float:
        return min(old, seconds)


def _slope(xs: list[int], ys: list[float]) -> float:
    """The least-squares slope of ys over xs (two xs at least), never below zero."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread)


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
    tokens_per_s: float | None  # predicted decode goodput of this plan (None before any cost is known)
    baseline_tokens_per_s: float | None  # predicted decode goodput of target-only for the same sequences
    reason: str  # one of REASONS
    # what target-only would take for this pass's work over what it takes (prompt rows included; see the module)
    speedup: float | None = None


class _Passes:
    """The module's pass model for n sequences beside P prompt rows, at fixed costs: the expected tokens and
    seconds of a pass whatever the sequences draft."""

    def __init__(self, n: int, prompt_rows: int, decode: Callable[[float], float],
                 with_prompt: Callable[[float], float], draft: Callable[[float], float] | None, fresh_chance: float,
                 width: int) -> None:
        self.n = n
        self.target = with_prompt if prompt_rows else decode  # T of this pass's kind
        self.prompt_rows = prompt_rows
        self.baseline_s = decode(n)  # T(n): target-only's pass without the prompt rows
        self.plain_s = self.target(n + prompt_rows)
        self.prompt_s = max(0.0, self.plain_s - self.baseline_s)  # t_P: the prompt rows' share of a pass
        self.drafts = draft is not None
        # per number of drafting sequences d (index d): the share of passes each is in, a draft step's seconds
        # while the pass runs, and the chance times the seconds of a fresh draft step the target waits for
        self.present, self.draft_step, self.wait_step = [1.0], [0.0], [0.0]
        f = fresh_chance
        for d in range(1, n + 1 if draft is not None else 1):
            plain = n - d
            skip = f if plain else f * (1.0 - f ** (n - 1))
            present = 1.0 / (1.0 + skip)
            rows = present * d * (width + skip)
            self.present.append(present)
            self.draft_step.append(draft(rows) if rows > 0 else 0.0)
            self.wait_step.append(0.0 if plain else f ** n * draft(d))

    def expected(self, drafting: int, steps: int, window_rows: float, window_tokens: float) -> tuple[float, float]:
        """(tokens, seconds) of a pass where `drafting` sequences draft up to `steps` tokens, their windows
        `window_rows` rows and `window_tokens` expected tokens in all."""
        if drafting == 0:
            return float(self.n), self.plain_s
        present = self.present[drafting]
        plain = self.n - drafting
        target = self.target(plain + present * window_rows + self.prompt_rows)
        seconds = max(target, steps * self.draft_step[drafting]) + steps * self.wait_step[drafting]
        return plain + present * window_tokens, max(seconds, 1e-12)

    def goodput(self, tokens: float, seconds: float) -> float:
        """Decode goodput: the tokens over the pass without the prompt rows' share."""
        return tokens / max(seconds - self.prompt_s, 1e-12)

    @property
    def baseline(self) -> float:
        return self.n / max(self.baseline_s, 1e-12)

    def speedup(self, tokens: float, seconds: float) -> float:
        """What target-only would take for the pass's work (its prompt rows, `tokens` tokens) over `seconds`."""
        return (self.prompt_s + tokens * self.baseline_s / self.n) / max(seconds, 1e-12)


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
        self.target = StepCosts()  # passes of windows alone
        self.target_prompt = StepCosts()  # passes that read prompt rows too (see observe_target)
        self._prompt_pass = False  # whether the pass planned last reads prompt rows
        self._last_passes: tuple[tuple, _Passes] | None = None  # the pass model last built, and for what
        self.draft = StepCosts()
        self.draft_best: StepCosts = _LowestCosts()
        self.miss_rate = MISS_START
        self._sequences: dict[int, Acceptance] = {}
        self._drafting: dict[int, bool] = {}  # whether the sequence drafted in its last plan
        self._all = Acceptance()
        self._explore_k = 0  # the k the next exploration tries
        self._explore_turn = 0  # whose turn it is to explore
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

    @property
    def drafting_off(self) -> bool:
        """Whether speculation is switched off now, the draft too slow to pay (probed back every probe_every_s)."""
        return self._off_since is not None

    @property
    def off_events(self) -> int:
        """Times speculation was switched off so far."""
        return self._off_events

    # --- observations

    def observe_target(self, rows: int, seconds: float) -> None:
        """One target batch pass: its rows (prompt rows included) and round-trip seconds. A pass that reads
        prompt rows (the last plan said so) has a cost curve of its own: its rows come with fewer sequences
        (each sequence costs a pass something of its own: its attention's KV reads, its verdict, its reply), so
        the chunks of the first seconds would make passes of many windows look cheaper than they are."""
        if rows >= 1 and seconds >= 0.0 and math.isfinite(seconds):
            (self.target_prompt if self._prompt_pass else self.target).observe(rows, seconds)

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
        self._drafting.pop(seq_id, None)

    # --- the model

    def _alphas(self, seq_ids: list[int]) -> list[float]:
        # over all observations so far, itself shrunk to the prior (one rejected first window is no evidence that
        # the draft never agrees: with nothing drafted after it, nothing would ever say otherwise)
        prior = self._all.rate(PRIOR_ACCEPTANCE, PRIOR_WEIGHT)
        fresh = Acceptance()
        return [self._sequences.get(seq_id, fresh).rate(prior, PRIOR_WEIGHT) for seq_id in seq_ids]

    def _fresh_chance(self) -> float:
        """f: the chance a drafting sequence's next window is not ready when its verification returns."""
        return 1.0 if self.mode == "serial" else min(1.0, max(0.0, self.miss_rate))

    def _passes(self, n: int, prompt_rows: int, branches: int, draft: StepCosts) -> _Passes | None:
        """The pass model for n sequences at the costs learnt so far (either kind of pass standing in for the
        other until it is measured); None before the target's are known."""
        if not self._target_observed:
            return None
        key = (n, prompt_rows, branches, id(draft), draft.version, self.target.version, self.target_prompt.version,
               self.miss_rate)
        if self._last_passes is not None and self._last_passes[0] == key:  # a plan builds it up to 3 times
            return self._last_passes[1]
        decode = self.target if self.target.observed else self.target_prompt
        with_prompt = self.target_prompt if self.target_prompt.observed else self.target
        width = branches if self.mode == "overlap" else 0
        passes = _Passes(n, prompt_rows, decode.curve(), with_prompt.curve(),
                         draft.curve() if draft.observed else None, self._fresh_chance(), width)
        self._last_passes = (key, passes)
        return passes

    @property
    def _target_observed(self) -> bool:
        return self.target.observed or self.target_prompt.observed

    def _plan_pass(self, ks: list[int], alphas: list[float], branches: int, prompt_rows: int,
                   draft: StepCosts) -> tuple[_Passes, float, float] | None:
        """The pass model, and the expected tokens and seconds of plan `ks`; None while a cost is unknown."""
        passes = self._passes(len(ks), prompt_rows, branches, draft)
        drafting = [(k, alpha) for k, alpha in zip(ks, alphas) if k > 0]
        if passes is None or (drafting and not passes.drafts):
            return None
        tokens, seconds = passes.expected(len(drafting), max(ks, default=0), sum(k + 1 for k, _ in drafting),
                                          sum(expected_tokens(alpha, k) for k, alpha in drafting))
        return passes, tokens, seconds

    def evaluate(self, ks: dict[int, int], branches: int = 1, prompt_rows: int = 0) -> float | None:
        """Predicted decode goodput (tokens/s) of any plan; None while a cost it needs is unknown."""
        if not ks:
            return None
        seq_ids = list(ks)
        planned = self._plan_pass([max(0, ks[s]) for s in seq_ids], self._alphas(seq_ids), branches, prompt_rows,
                                  self.draft)
        if planned is None:
            return None
        passes, tokens, seconds = planned
        return passes.goodput(tokens, seconds)

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

    def _best(self, gains: list[tuple[float, int, int]], n: int, branches: int, prompt_rows: int,
              draft: StepCosts) -> list[int]:
        """The ks of the best prefix of `gains`, every prefix's pass evaluated by `_Passes`."""
        passes = self._passes(n, prompt_rows, branches, draft)
        assert passes is not None and passes.drafts
        best, best_length = passes.baseline * MIN_GAIN, 0
        drafting = steps = 0
        rows = tokens = 0.0
        # passes.expected and passes.goodput inlined: this loop runs for every plan, n * cap times
        target, present, draft_step, wait_step = passes.target, passes.present, passes.draft_step, passes.wait_step
        prompt_rows, prompt_s = passes.prompt_rows, passes.prompt_s
        for length, (negative_gain, j, _) in enumerate(gains, start=1):
            if j == 1:  # the sequence's first drafted token: its window of 2 rows, 1 + alpha tokens
                drafting += 1
                rows += 2.0
                tokens += 1.0 - negative_gain
            else:
                rows += 1.0
                tokens -= negative_gain
            if j > steps:
                steps = j
            share, plain = present[drafting], n - drafting
            seconds = target(plain + share * rows + prompt_rows)
            if steps * draft_step[drafting] > seconds:
                seconds = steps * draft_step[drafting]
            seconds += steps * wait_step[drafting] - prompt_s
            goodput = (plain + share * tokens) / (seconds if seconds > 1e-12 else 1e-12)
            if goodput > best * (1.0 + 1e-12):  # ties: fewer drafted tokens
                best, best_length = goodput, length
        ks = [0] * n
        for _, _, index in gains[:best_length]:
            ks[index] += 1
        return ks

    # --- planning

    def plan(self, seq_ids: list[int], branches: int = 1, prompt_rows: int = 0) -> SpeculationPlan:
        """k per sequence for this step. `seq_ids`: the sequences whose windows the next pass verifies;
        `branches`: overlap drafts ahead that many outcome branches per sequence, each a draft row per drafted
        token; `prompt_rows`: the prompt tokens the pass reads beside them (a prompt's prefill chunk)."""
        seq_ids = list(dict.fromkeys(seq_ids))
        now = self.clock()
        self._prompt_pass = prompt_rows > 0  # what the next observe_target measures
        if not seq_ids:
            # nothing decodes: a pass of prompt rows alone takes target-only as long (speedup 1)
            self._close_ratio(now)
            self._last_ratio = 1.0 if prompt_rows > 0 else None
            return SpeculationPlan({}, None, None, GOODPUT, self._last_ratio)
        self._plans += 1
        n, cap = len(seq_ids), self.cap
        prompt_rows = max(0, prompt_rows)
        alphas = self._alphas(seq_ids)
        if not self._target_observed or (cap > 0 and not self.draft.observed):
            return self._record(seq_ids, [cap] * n, alphas, branches, prompt_rows, WARMING_UP, now)
        if self._off_since is not None and now - self._last_probe >= self.probe_every_s:
            self._last_probe = now
            self._probe_pending = True
            return self._record(seq_ids, [min(1, cap)] * n, alphas, branches, prompt_rows, PROBING, now)

        gains = self._order(alphas)
        ks = self._best(gains, n, branches, prompt_rows, self.draft)
        if cap > 0 and not any(ks) and (self._off_since is not None or self._draft_slowed(n, branches)):
            at_best = self._best(gains, n, branches, prompt_rows, self.draft_best)
            drafting, cost, lowest = self._draft_step(at_best, branches)
            if drafting:
                if self._off_since is not None or cost >= TOO_SLOW * lowest:
                    if self._off_since is None:
                        self._off_since = self._last_probe = now
                        self._off_events += 1
                        self._event(f"speculation off: a draft step costs {cost * 1e3:.1f} ms at {drafting} "
                                    f"rows (at best {lowest * 1e3:.1f} ms); drafting no longer pays")
                    return self._record(seq_ids, ks, alphas, branches, prompt_rows, DRAFT_TOO_SLOW, now)
        if self._off_since is not None:
            self._off_total_s += now - self._off_since
            self._off_since = None
            self._probe_pending = False
            drafting, cost, lowest = self._draft_step(ks, branches, at_least=1)
            self._event(f"speculation on again: a draft step costs {cost * 1e3:.1f} ms at {drafting} rows "
                        f"(at best {lowest * 1e3:.1f} ms)")
        ks = self._one_starts(seq_ids, ks, alphas, branches, prompt_rows)
        if cap > 0 and self.explore_every >= 1 and self._plans % self.explore_every == 0:
            explored = self._explore(ks, alphas, branches, prompt_rows)
            if explored is not None:
                return self._record(seq_ids, explored, alphas, branches, prompt_rows, EXPLORING, now)
        return self._record(seq_ids, ks, alphas, branches, prompt_rows, GOODPUT, now)

    def _draft_slowed(self, n: int, branches: int) -> bool:
        """Whether a draft step costs TOO_SLOW times its best seen, at one row, one sequence's or every
        sequence's rows (a cheap test before planning again at the best costs)."""
        width = branches if self.mode == "overlap" else 1
        for rows in (1, width, n * width):
            cost, lowest = self.draft.estimate(rows), self.draft_best.estimate(rows)
            if cost is not None and lowest is not None and cost >= TOO_SLOW * lowest:
                return True
        return False

    def _one_starts(self, seq_ids: list[int], ks: list[int], alphas: list[float], branches: int,
                    prompt_rows: int) -> list[int]:
        """At most one sequence that did not draft in its last plan starts drafting, the likeliest (see the
        module); target-only if what is left does not beat it by MIN_GAIN."""
        starting = [i for i, (seq_id, k) in enumerate(zip(seq_ids, ks))
                    if k and not self._drafting.get(seq_id, seq_id in self._sequences)]
        if len(starting) <= 1:
            return ks
        first = max(starting, key=lambda i: alphas[i])
        staggered = [0 if i in starting and i != first else k for i, k in enumerate(ks)]
        planned = self._plan_pass(staggered, alphas, branches, prompt_rows, self.draft)
        if planned is None or planned[0].goodput(planned[1], planned[2]) <= planned[0].baseline * MIN_GAIN:
            return [0] * len(ks)
        return staggered

    def _explore(self, ks: list[int], alphas: list[float], branches: int, prompt_rows: int) -> list[int] | None:
        """Target-only, while its pass (n rows alone) is fewer rows than any measured and the plan drafts;
        otherwise the plan with one drafting sequence (in turn) at another k (cycling through 0..cap). Where
        the plan drafts nothing, one sequence (in turn) drafts a token if it would draft at the acceptance of
        all sequences (its own, from unlucky first windows, would otherwise never be measured again); None
        (no exploration) if not."""
        drafting = [i for i, k in enumerate(ks) if k]
        if not drafting:
            index = self._explore_turn % len(ks)
            self._explore_turn += 1
            hopeful = list(alphas)
            hopeful[index] = max(alphas[index], self._all.rate(PRIOR_ACCEPTANCE, PRIOR_WEIGHT))
            if not self._best(self._order(hopeful), len(ks), branches, prompt_rows, self.draft)[index]:
                return None
            explored = list(ks)
            explored[index] = 1
            return explored
        if not prompt_rows and len(ks) < self.target.fewest:
            return [0] * len(ks)
        index = drafting[self._explore_turn % len(drafting)]
        self._explore_turn += 1
        k = self._explore_k
        if k == ks[index]:
            k = (k + 1) % (self.cap + 1)
        self._explore_k = (k + 1) % (self.cap + 1)
        explored = list(ks)
        explored[index] = k
        return explored

    def _draft_step(self, ks: list[int], branches: int, at_least: int = 0) -> tuple[int, float, float]:
        """The rows of one draft step of plan `ks`, and what such a step costs now and at best seen."""
        drafting = max(at_least, sum(1 for k in ks if k > 0) * (branches if self.mode == "overlap" else 1))
        return drafting, self.draft.estimate(drafting) or 0.0, self.draft_best.estimate(drafting) or 0.0

    def _event(self, line: str) -> None:
        if self.on_event is not None:
            self.on_event(line)

    def _record(self, seq_ids: list[int], ks: list[int], alphas: list[float], branches: int, prompt_rows: int,
                reason: str, now: float) -> SpeculationPlan:
        planned = self._plan_pass(ks, alphas, branches, prompt_rows, self.draft)
        for seq_id, k in zip(seq_ids, ks):
            self._drafting[seq_id] = k > 0
        self._pairs += len(ks)
        self._k_total += sum(ks)
        self._zero_pairs += sum(1 for k in ks if k == 0)
        self._reasons[reason] = self._reasons.get(reason, 0) + 1
        self._close_ratio(now)
        self._last_ratio = None
        if planned is None:  # a cost it needs is unknown (the draft's, warming up): target-only's at most
            base = (self.target if self.target.observed else self.target_prompt).estimate(len(ks))
            return SpeculationPlan(dict(zip(seq_ids, ks)), None, None if base is None else len(ks) / max(base, 1e-12),
                                   reason)
        passes, tokens, seconds = planned
        self._last_ratio = passes.speedup(tokens, seconds)
        self._ratio_sum += self._last_ratio
        self._ratio_count += 1
        return SpeculationPlan(dict(zip(seq_ids, ks)), passes.goodput(tokens, seconds), passes.baseline, reason,
                               self._last_ratio)

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
