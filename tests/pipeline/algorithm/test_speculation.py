"""The goodput controller on its own: costs and acceptances in, k per sequence out, no workers or clocks.

Each test feeds the costs and acceptance rates of one situation and checks what a user would notice:
how much each sequence drafts, the predicted speedup, and when speculation switches itself off."""

import random

import pytest

from pipeline.algorithm.speculation import (
    Acceptance,
    GoodputController,
    SpeculationPlan,
    StepCosts,
    expected_tokens,
)

MS = 1e-3
CPU_TARGET = {1: 4.6, 3: 7.2, 4: 7.7, 6: 9.2}  # ms per target round trip at these row counts, on this CPU


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def accepting(controller: GoodputController, seq_id: int, rate: float, windows: int = 20) -> None:
    """`windows` rejected verifications whose accepted tokens make the acceptance rate about `rate`: a
    geometric model accepts rate / (1 - rate) tokens per rejection."""
    per_rejection = rate / (1 - rate)
    for window in range(windows):
        accepted = int((window + 1) * per_rejection) - int(window * per_rejection)
        controller.observe_acceptance(seq_id, accepted + 1, accepted)


def linear_target(controller: GoodputController, base_ms: float, per_row_ms: float, rows: range) -> None:
    for count in rows:
        controller.observe_target(count, (base_ms + per_row_ms * count) * MS)


def cpu_stream(clock: Clock | None = None, **options) -> GoodputController:
    """One stream in overlap mode with this CPU's costs: drafting ahead 9 branches, acceptance 0.75."""
    options.setdefault("explore_every", 0)
    controller = GoodputController(5, "overlap", clock=clock or Clock(), **options)
    for count, ms in CPU_TARGET.items():
        controller.observe_target(count, ms * MS)
    controller.observe_draft(9, 3, 3 * 1.3 * MS)
    controller.observe_draft(1, 3, 3 * 1.0 * MS)
    for _ in range(10):
        controller.observe_acceptance(1, 5, 3)  # 3 accepted per rejection: 0.75
    return controller


def this_cpu_target_ms(rows: float) -> float:
    """The bundled target's pass on this project's 2-vCPU EPYC while its AVX2 kernels swept 2 rows at a time (before
    the 6x16 tile), round trip: a machine where drafted rows cost a millisecond each."""
    return 3.6 + 0.4 * min(rows - 1, 1) + 1.0 * max(0.0, rows - 2)


def this_cpu(streams: int, rate: float, mode: str = "overlap", **options) -> GoodputController:
    """`streams` sequences of acceptance `rate` with this CPU's costs: the target's above, the draft 1.2 ms a
    step plus 0.1 ms a row; a pre-draft miss one verification in five."""
    options.setdefault("explore_every", 0)
    controller = GoodputController(3, mode, clock=Clock(), **options)
    for count in (1, 2, 3, 4, 8, 16, 32, 64, 80):
        controller.observe_target(count, this_cpu_target_ms(count) * MS)
    for count in (1, 4, 16, 64, 128):
        controller.observe_draft(count, 3, 3 * (1.2 + 0.1 * count) * MS)
    controller.miss_rate = 0.2
    for seq_id in range(streams):
        accepting(controller, seq_id, rate)
    return controller


def speedup(plan: SpeculationPlan) -> float:
    assert plan.tokens_per_s is not None and plan.baseline_tokens_per_s is not None
    return plan.tokens_per_s / plan.baseline_tokens_per_s


def test_expected_tokens_counts_the_bonus_token():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 4) == 5.0


def test_step_costs_interpolate_between_and_take_a_lower_bound_below_observed_row_counts():
    costs = StepCosts()
    assert not costs.observed and costs.estimate(3) is None
    for count, seconds in [(2, 1.0), (4, 2.0), (8, 3.0)]:
        costs.observe(count, seconds)
    assert costs.observed and costs.fewest == 2
    assert costs.estimate(4) == 2.0
    assert costs.estimate(3) == pytest.approx(1.5)
    assert costs.estimate(6) == pytest.approx(2.5)
    assert costs.estimate(1) == pytest.approx(0.5)  # on the line from the origin to the fewest rows' cost
    prompts = StepCosts()  # only prompt chunks seen so far: 56 and 64 rows
    prompts.observe(56, 60 * MS)
    prompts.observe(64, 68 * MS)
    # a plain step of 2 rows: a lower bound, not as dear as a chunk's pass (a flat guess, 60 ms), nor on the
    # chunks' slope (their fixed cost, a few ms in 60, is noise)
    assert prompts.estimate(2) == pytest.approx(60 * MS * 2 / 56)


def test_step_costs_extrapolate_above_the_largest_row_count():
    costs = StepCosts()
    costs.observe(4, 2.0)
    assert costs.estimate(8) == pytest.approx(4.0)  # one point: linear through the origin
    assert costs.estimate(2) == pytest.approx(1.0)
    costs.observe(8, 3.0)
    assert costs.estimate(12) == pytest.approx(4.0)  # the slope of the largest two
    falling = StepCosts()
    falling.observe(2, 2.0)
    falling.observe(4, 1.0)
    # a pass never gets cheaper with more rows: the two are pooled, and the slope is never below zero
    assert [falling.estimate(count) for count in (2, 4, 10)] == pytest.approx([1.5, 1.5, 1.5])
    upper = StepCosts()
    for count, ms in [(1, 3.0), (2, 3.1), (10, 12.0), (16, 18.0), (20, 22.0)]:
        upper.observe(count, ms * MS)
    # above the largest: the least-squares slope of the upper half (10, 16, 20: 1 ms a row), not of the
    # cheap first rows
    assert upper.estimate(40) == pytest.approx(42.0 * MS)


def test_step_costs_fit_rows_past_the_register_block_and_ignore_a_noisy_spike():
    # the CPU kernels: about one price up to 6 rows (the register block), then 1 ms a row (FMA-bound)
    def true_ms(rows: float) -> float:
        return 3.6 + 0.1 * min(rows, 6) + 1.0 * max(0.0, rows - 6)

    costs = StepCosts()
    for count in (1, 3, 6, 9, 16, 24, 40):
        costs.observe(count, true_ms(count) * MS)
    for rows in (2, 6, 7, 12, 16, 20, 30, 64, 80):  # between the counts seen and past them: the cost itself
        assert costs.estimate(rows) == pytest.approx(true_ms(rows) * MS)
    assert costs.estimate(12.5) == pytest.approx(true_ms(12.5) * MS)  # an expected, fractional row count
    costs.observe(20, 3 * true_ms(20) * MS)  # a busy spell at one row count
    values = [costs.estimate(rows) for rows in range(1, 60)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # rows past it never look free


def test_step_costs_average_repeated_observations():
    costs = StepCosts(smoothing=0.3)
    costs.observe(2, 1.0)
    costs.observe(2, 2.0)
    assert costs.estimate(2) == pytest.approx(1.3)
    costs.observe(2, 2.0)
    assert costs.estimate(2) == pytest.approx(1.51)


def test_acceptance_is_the_geometric_estimate_shrunk_to_the_prior():
    acceptance = Acceptance()
    assert acceptance.rate(0.6, 4) == pytest.approx(0.6)
    acceptance.observe(5, 3)  # 3 accepted, then a rejection
    acceptance.observe(4, 4)  # all accepted: no rejection
    assert acceptance.rate(0.6, 0) == pytest.approx(7 / 8)
    assert acceptance.rate(0.6, 4) == pytest.approx((7 + 2.4) / 12)
    acceptance.observe(0, 0)
    assert acceptance.rate(0.6, 0) == pytest.approx(7 / 8)
    always = Acceptance()
    always.observe(8, 8)
    assert always.rate(1.0, 4) == 0.999


def test_one_stream_on_this_cpu_drafts_a_few_tokens_for_a_clear_speedup():
    controller = cpu_stream()
    plan = controller.plan([1], branches=9)
    assert plan.reason == "goodput"
    assert 2 <= plan.ks[1] <= 5
    assert 1.4 <= speedup(plan) <= 2.3
    best_fixed = max(controller.evaluate({1: k}, branches=9) for k in range(6))
    assert plan.tokens_per_s == pytest.approx(best_fixed)
    for _ in range(30):
        controller.observe_predraft(True)  # fewer misses: the drafting ahead is hidden better
    assert speedup(controller.plan([1], branches=9)) > speedup(plan)


def test_evaluate_models_a_serial_cycle():
    controller = GoodputController(4, "serial", explore_every=0)
    assert controller.evaluate({1: 2, 2: 0}) is None
    linear_target(controller, 2.0, 1.0, range(1, 9))
    assert controller.evaluate({1: 0, 2: 0}) == pytest.approx(2 / (4 * MS))  # no draft cost needed
    assert controller.evaluate({1: 2, 2: 0}) is None
    controller.observe_draft(1, 2, 2 * 0.5 * MS)
    controller.observe_draft(2, 2, 2 * 0.5 * MS)  # a draft step: 0.5 ms for one row or two
    accepting(controller, 1, 0.5)
    accepting(controller, 2, 0.5)
    # both draft: the target waits for the draft, 2 steps of 2 rows (1 ms), then verifies 3 + 3 rows (8 ms)
    # (acceptance 0.5 within 0.1 %: the prior, 0.6, weighs 4 windows of 40)
    assert controller.evaluate({1: 2, 2: 2}) == pytest.approx(3.5 / (9 * MS), rel=1e-3)
    # one drafts: sequence 2 is ready at once, so the target runs a pass without sequence 1 (drafted meanwhile),
    # which joins the next: it is in every other pass, 1 + 3 / 2 rows and 1 + 1.75 / 2 tokens a pass
    assert controller.evaluate({1: 2, 2: 0}) == pytest.approx(1.875 / (4.5 * MS), rel=1e-3)


def test_a_compute_bound_target_with_many_streams_drafts_less_per_sequence():
    def mean_k(streams: int) -> tuple[float, SpeculationPlan]:
        controller = GoodputController(8, "serial", explore_every=0)
        linear_target(controller, 2.0, 0.6, range(1, 160))
        for count in (1, 4, 16):
            controller.observe_draft(count, 1, (0.2 + 0.01 * count) * MS)
        for seq_id in range(streams):
            accepting(controller, seq_id, 0.9)
        plan = controller.plan(list(range(streams)))
        assert plan.reason == "goodput"
        return sum(plan.ks.values()) / streams, plan

    one, alone = mean_k(1)
    many, batched = mean_k(16)
    assert one >= 3
    assert many < one
    assert speedup(alone) > 1.3
    assert batched.tokens_per_s >= batched.baseline_tokens_per_s


def test_at_concurrency_16_rows_past_the_register_block_cost_more_than_drafting_gains():
    # this CPU: a row past the first two costs 1 ms, while target-only spends 19.6 / 16 = 1.2 ms a token at
    # 16 rows; a drafted token accepted 7 times in 10, behind a miss one time in five, does not pay for its row
    many = this_cpu(16, 0.7)
    plan = many.plan(list(range(16)), branches=6)
    assert plan.reason == "goodput" and set(plan.ks.values()) == {0}
    assert plan.tokens_per_s == pytest.approx(16 / (this_cpu_target_ms(16) * MS))
    assert plan.speedup == pytest.approx(1.0)
    # one stream on the same costs: its second row is nearly free, and the draft's steps hide behind the pass
    one = this_cpu(1, 0.7)
    alone = one.plan([0], branches=6)
    assert alone.ks[0] >= 1 and speedup(alone) > 1.2
    # four streams: drafting pays only where the target agrees more often
    assert set(this_cpu(4, 0.7).plan(list(range(4)), branches=6).ks.values()) == {0}
    assert all(this_cpu(4, 0.9).plan(list(range(4)), branches=6).ks.values())


def test_the_predicted_pass_costs_what_its_rows_cost():
    # a linear cost per row past 6 rows: the model's pass is the cost of its rows, its baseline n / T(n)
    def true_ms(rows: float) -> float:
        return 2.0 + 0.05 * min(rows, 6) + 0.4 * max(0.0, rows - 6)

    controller = GoodputController(3, "overlap", explore_every=0)
    for count in (1, 6, 10, 20, 40, 60):
        controller.observe_target(count, true_ms(count) * MS)
    controller.observe_draft(1, 3, 3 * 0.2 * MS)
    for _ in range(40):
        controller.observe_predraft(True)  # no misses: every pass holds every sequence
    assert controller.evaluate({s: 0 for s in range(16)}) == pytest.approx(16 / (true_ms(16) * MS))
    for seq_id in range(16):
        accepting(controller, seq_id, 0.5)
    ks = {s: 2 for s in range(16)}  # 48 rows, 1.75 tokens a window
    assert controller.evaluate(ks, branches=1) == pytest.approx(
        16 * 1.75 / (true_ms(48) * MS), rel=0.02)  # the miss rate left is below 2 %


def test_a_miss_at_concurrency_skips_a_pass_and_alone_waits_for_the_draft():
    controller = GoodputController(2, "overlap", explore_every=0)
    linear_target(controller, 4.0, 1.0, range(1, 40))
    controller.observe_draft(1, 2, 2 * 1.0 * MS)
    controller.observe_draft(8, 2, 2 * 1.0 * MS)  # a draft step: 1 ms, whatever its rows
    controller.miss_rate = 0.25
    accepting(controller, 1, 0.5)
    accepting(controller, 2, 0.5)
    # alone: the target waits for a fresh draft (2 steps, 2 ms) one time in four
    assert controller.evaluate({1: 2}, branches=2) == pytest.approx(1.75 / ((7 + 0.25 * 2) * MS), rel=1e-3)
    # beside a plain sequence the target goes on without it: it is in 1 / 1.25 of the passes
    present = 1 / 1.25
    expected = (1 + present * 1.75) / ((4 + 1 + present * 3) * MS)
    assert controller.evaluate({1: 2, 2: 0}, branches=2) == pytest.approx(expected, rel=1e-3)


def test_prompt_rows_in_the_pass_dilute_the_speedup_not_the_plan():
    controller = this_cpu(4, 0.9)
    ids = list(range(4))
    decode = controller.plan(ids, branches=6)
    with_prompt = controller.plan(ids, branches=6, prompt_rows=64)
    assert with_prompt.ks == decode.ks and any(decode.ks.values())
    assert speedup(with_prompt) == pytest.approx(speedup(decode), rel=0.02)  # the decode goodputs
    # the pass's speedup: target-only reads the same prompt rows in the same time, so it is closer to 1
    assert 1.0 < with_prompt.speedup < decode.speedup
    assert decode.speedup == pytest.approx(speedup(decode))  # without prompt rows: the goodputs' ratio


def test_a_pass_of_prompt_rows_alone_counts_as_no_speedup():
    clock = Clock()
    controller = this_cpu(2, 0.8)
    controller.clock = clock
    reading = controller.plan([], branches=6, prompt_rows=64)  # nothing decodes yet: the pass reads a prompt
    assert reading.ks == {} and reading.speedup == 1.0
    clock.now += 3.0
    decoding = controller.plan([0, 1], branches=6)
    clock.now += 1.0
    assert controller.summary()["predicted_speedup"] == pytest.approx((3 * 1.0 + decoding.speedup) / 4)
    controller.plan([], branches=6)  # nothing at all: no time counted
    clock.now += 5.0
    assert controller.summary()["predicted_speedup"] == pytest.approx((3 * 1.0 + decoding.speedup) / 4)


def test_sequences_that_were_not_drafting_start_one_per_plan():
    controller = this_cpu(0, 0.9)  # costs only: no sequence has drafted yet
    for seq_id in range(4):
        for _ in range(20):
            controller.observe_acceptance(seq_id + 10, 3, 3)  # others agreed: the prior is high
    ids = [0, 1, 2, 3]
    started = []
    for _ in range(4):  # the draft must read each one's prompt first: not all four at once
        plan = controller.plan(ids, branches=6)
        started.append(sum(1 for k in plan.ks.values() if k))
    assert started == [1, 2, 3, 4]
    exploring = this_cpu(0, 0.9, explore_every=1)
    for seq_id in range(16):
        exploring.observe_acceptance(seq_id + 100, 3, 3)
    for _ in range(3):  # every plan may explore: still one starts a plan at most
        plan = exploring.plan(list(range(16)), branches=6)
        assert sum(1 for k in plan.ks.values() if k) <= 1


def test_passes_that_read_prompt_rows_are_a_cost_curve_of_their_own():
    controller = this_cpu(4, 0.8)
    ids = list(range(4))
    controller.plan(ids, branches=6, prompt_rows=64)
    controller.observe_target(68, 40 * MS)  # a chunk beside few windows: cheap rows
    assert controller.target_prompt.estimate(68) == pytest.approx(40 * MS)
    assert controller.target.estimate(68) == pytest.approx(this_cpu_target_ms(68) * MS)  # windows' passes untouched
    controller.plan(ids, branches=6)
    controller.observe_target(16, 30 * MS)
    assert controller.target.estimate(16) == pytest.approx((this_cpu_target_ms(16) + 0.3 * (30 - this_cpu_target_ms(16))) * MS)


def test_target_only_is_explored_while_its_row_count_is_unmeasured():
    controller = GoodputController(3, "overlap", clock=Clock(), explore_every=2)
    for count, ms in ((3, 3.0), (8, 3.1), (12, 3.3)):  # windows only: 2 rows (target-only) never measured
        controller.observe_target(count, ms * MS)
    controller.observe_draft(12, 3, 3 * 0.5 * MS)
    accepting(controller, 1, 0.95)
    accepting(controller, 2, 0.95)
    assert all(controller.plan([1, 2], branches=6).ks.values())
    explored = controller.plan([1, 2], branches=6)
    assert explored.reason == "exploring" and explored.ks == {1: 0, 2: 0}
    controller.observe_target(2, 3.0 * MS)
    controller.plan([1, 2], branches=6)
    explored = controller.plan([1, 2], branches=6)  # measured now: one sequence at another k
    assert explored.reason == "exploring" and sum(1 for k in explored.ks.values() if k) == 1


def test_low_acceptance_with_linear_costs_falls_back_to_the_target_alone():
    controller = GoodputController(5, "serial", explore_every=0)
    linear_target(controller, 1.0, 1.0, range(1, 100))
    for count in (1, 16):
        controller.observe_draft(count, 1, 0.3 * MS)
    for seq_id in range(16):
        accepting(controller, seq_id, 0.3)
    plan = controller.plan(list(range(16)))
    assert plan.reason == "goodput"
    assert set(plan.ks.values()) == {0}
    assert plan.tokens_per_s == pytest.approx(plan.baseline_tokens_per_s)
    assert plan.baseline_tokens_per_s == pytest.approx(16 / (17 * MS))


@pytest.mark.parametrize("mode", ["serial", "overlap"])
def test_a_goodput_plan_is_never_predicted_below_the_target_alone(mode):
    rng = random.Random(7)
    for _ in range(40):
        controller = GoodputController(rng.randint(1, 8), mode, explore_every=0)
        base, per_row = rng.uniform(0.5, 5), rng.uniform(0.01, 1.5)
        linear_target(controller, base, per_row, range(1, 600, rng.randint(1, 7)))
        for count in (1, 3, 9, 40, 200):
            controller.observe_draft(count, 2, 2 * rng.uniform(0.1, 3) * MS)
        streams = rng.randint(1, 40)
        for seq_id in range(streams):
            accepting(controller, seq_id, rng.random(), windows=rng.randint(0, 5))
        plan = controller.plan(list(range(streams)), branches=rng.randint(1, 9))
        assert plan.reason == "goodput"
        assert plan.tokens_per_s >= plan.baseline_tokens_per_s * (1 - 1e-9)
        assert set(plan.ks) == set(range(streams))
        assert all(0 <= k <= controller.cap for k in plan.ks.values())


def test_a_sequence_the_target_agrees_with_more_drafts_more():
    controller = GoodputController(8, "serial", explore_every=0)
    linear_target(controller, 4.0, 0.3, range(1, 40))
    for count in (1, 2, 4):
        controller.observe_draft(count, 1, 0.4 * MS)
    accepting(controller, 1, 0.9)
    accepting(controller, 2, 0.4)
    plan = controller.plan([1, 2, 3])  # 3 is new: it drafts at the prior of everything seen
    assert plan.ks[1] > plan.ks[3] > plan.ks[2]
    controller.forget(1)
    assert controller.plan([1, 2]).ks[1] < plan.ks[1]


def test_plans_cover_exactly_the_sequences_asked_for():
    controller = cpu_stream()
    plan = controller.plan([4, 1, 4, 9], branches=9)
    assert list(plan.ks) == [4, 1, 9]
    assert all(0 <= k <= 5 for k in plan.ks.values())
    assert controller.plan([]).ks == {}


def test_a_draft_slowed_down_switches_speculation_off_and_probes_until_it_recovers():
    clock, events = Clock(), []
    controller = cpu_stream(clock, probe_every_s=1.0, on_event=events.append)
    assert controller.plan([1], branches=9).ks[1] > 0

    for _ in range(12):  # the draft's host gets busy: every step 20 times slower
        controller.observe_draft(9, 3, 3 * 26 * MS)
        controller.observe_draft(1, 3, 3 * 20 * MS)
    slow = controller.plan([1], branches=9)
    assert slow.ks == {1: 0} and slow.reason == "draft too slow"
    assert slow.tokens_per_s == pytest.approx(slow.baseline_tokens_per_s)
    assert len(events) == 1 and events[0].startswith("speculation off: a draft step costs")
    assert "at best 1.3 ms" in events[0] and "drafting no longer pays" in events[0]
    clock.now += 0.5
    assert controller.plan([1], branches=9).reason == "draft too slow"
    assert len(events) == 1

    clock.now += 0.6  # past probe_every_s since it switched off
    probe = controller.plan([1], branches=9)
    assert probe.ks == {1: 1} and probe.reason == "probing"
    controller.observe_draft(9, 1, 26 * MS)  # still busy
    clock.now += 0.1
    assert controller.plan([1], branches=9).reason == "draft too slow"
    clock.now += 1.0
    assert controller.plan([1], branches=9).reason == "probing"
    controller.observe_draft(9, 1, 1.3 * MS)  # the host is idle again
    clock.now += 0.1
    resumed = controller.plan([1], branches=9)
    assert resumed.reason == "goodput" and resumed.ks[1] > 0
    assert len(events) == 2 and events[1].startswith("speculation on again")

    summary = controller.summary()
    assert summary["speculation_off_events"] == 1
    assert summary["speculation_off_s"] == pytest.approx(2.3)
    assert summary["reasons"] == {"goodput": 2, "draft too slow": 3, "probing": 2}


def test_probes_bring_speculation_back_within_three_probes():
    clock, events = Clock(), []
    controller = GoodputController(4, "serial", clock=clock, explore_every=0, on_event=events.append)
    linear_target(controller, 3.0, 0.2, range(1, 30))
    ids = list(range(4))
    for seq_id in ids:
        accepting(controller, seq_id, 0.8)
    controller.observe_draft(4, 1, 0.5 * MS)
    assert any(controller.plan(ids).ks.values())
    for _ in range(12):
        controller.observe_draft(4, 2, 2 * 10 * MS)
    assert controller.plan(ids).reason == "draft too slow"
    for probes in range(1, 4):
        clock.now += 1.0
        assert controller.plan(ids).reason == "probing"
        controller.observe_draft(4, 1, 0.5 * MS)
        plan = controller.plan(ids)
        if plan.reason == "goodput":
            break
    assert plan.reason == "goodput" and any(plan.ks.values())
    assert probes <= 3
    assert [event.split(":")[0] for event in events] == ["speculation off", "speculation on again"]


def test_costs_are_measured_first_then_one_drafting_sequence_at_a_time_explores():
    controller = GoodputController(3, "overlap", clock=Clock(), explore_every=4)
    ids = [1, 2]
    first = controller.plan(ids, branches=2)
    assert first.reason == "warming up" and first.ks == {1: 3, 2: 3}
    assert first.tokens_per_s is None and first.baseline_tokens_per_s is None
    controller.observe_target(8, 9 * MS)
    second = controller.plan(ids, branches=2)
    assert second.reason == "warming up" and second.baseline_tokens_per_s is not None
    for count, ms in ((2, 5.0), (4, 6.0), (8, 9.0)):  # AVX2-like: the second row nearly free
        controller.observe_target(count, ms * MS)
    controller.observe_draft(4, 3, 3 * 0.5 * MS)
    accepting(controller, 1, 0.9)
    accepting(controller, 2, 0.9)
    reasons, explored, planned = [], [], None
    for _ in range(14):
        plan = controller.plan(ids, branches=2)
        reasons.append(plan.reason)
        if plan.reason == "exploring":
            explored.append(plan.ks)
        else:
            planned = plan.ks
    assert all(planned.values())
    # plans 4, 8, 12, 16 explore: one drafting sequence in turn at another k than planned, k cycling 0..cap
    assert [i + 3 for i, reason in enumerate(reasons) if reason == "exploring"] == [4, 8, 12, 16]
    assert set(reasons) == {"goodput", "exploring"}
    for turn, ks in enumerate(explored):
        mine, other = ids[turn % 2], ids[(turn + 1) % 2]
        assert ks[other] == planned[other] and ks[mine] != planned[mine]
    assert {ks[ids[turn % 2]] for turn, ks in enumerate(explored)} >= {0}


def test_many_sequences_on_expensive_rows_explore_nothing():
    # nothing drafts at concurrency 16 on this CPU, so no sequence is sent drafting to explore: each would wait
    # for the draft to read its whole context first
    controller = this_cpu(16, 0.7, explore_every=16)
    plans = [controller.plan(list(range(16)), branches=6) for _ in range(32)]
    assert all(not any(plan.ks.values()) for plan in plans)
    assert {plan.reason for plan in plans} == {"goodput"}


def test_summary_reports_what_was_planned_and_the_predicted_speedup():
    clock = Clock()
    controller = cpu_stream(clock)
    ks = []
    for _ in range(5):
        plan = controller.plan([1, 2], branches=9)
        ks += plan.ks.values()
        clock.now += 0.01
    summary = controller.summary()
    assert summary["plans"] == 5
    assert summary["mean_k"] == pytest.approx(sum(ks) / len(ks))
    assert summary["zero_k_share"] == pytest.approx(ks.count(0) / len(ks))
    assert summary["reasons"] == {"goodput": 5}
    assert summary["speculation_off_events"] == 0 and summary["speculation_off_s"] == 0.0
    assert summary["predicted_speedup"] == pytest.approx(speedup(plan))
    assert 1.2 < summary["predicted_speedup"] < 2.5


def test_predicted_speedup_weighs_plans_by_the_time_they_held():
    clock = Clock()
    controller = cpu_stream(clock, explore_every=2)
    good = controller.plan([1], branches=9)  # plan 1: goodput, held 3 s
    clock.now += 3.0
    plain = controller.plan([1], branches=9)  # plan 2: explores k = 0, held 1 s
    assert plain.reason == "exploring" and speedup(plain) == pytest.approx(1.0)
    clock.now += 1.0
    assert controller.summary()["predicted_speedup"] == pytest.approx((3 * speedup(good) + 1.0) / 4)


def test_one_rejected_first_window_does_not_stop_drafting_for_good():
    controller = GoodputController(3, "overlap", explore_every=0)
    for count, ms in ((1, 5.15), (4, 7.3), (59, 61.0), (64, 55.0)):
        controller.observe_target(count, ms * MS)
    controller.observe_draft(199, 4, 27.6 * MS)  # the draft's first request read the prompt
    controller.observe_acceptance(0, 3, 0)  # the first window, drafted on the prompt alone: all rejected
    # everything seen so far is one rejection, but it weighs as one window against the prior's four
    plan = controller.plan([0], branches=5)
    assert plan.ks[0] > 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        GoodputController(3, "parallel")
    with pytest.raises(ValueError):
        GoodputController(-1, "serial")
    with pytest.raises(ValueError):
        StepCosts(smoothing=0)
    controller = GoodputController(3, "serial")
    controller.observe_target(0, 1.0)  # nonsense measurements are ignored
    controller.observe_draft(4, 0, 1.0)
    controller.observe_target(3, float("nan"))
    assert not controller.target.observed and not controller.draft.observed


def test_a_sequence_left_at_k0_by_unlucky_first_windows_is_measured_again():
    controller = this_cpu(1, 0.8, explore_every=4)
    accepting(controller, 7, 0.05)  # its first windows: nearly nothing accepted
    for seq_id in range(1, 6):  # the rest of the run so far accepts as usual
        accepting(controller, 100 + seq_id, 0.8)
    plans = [controller.plan([7]) for _ in range(8)]
    assert [plan.reason for plan in plans].count("exploring") == 2
    assert all(plan.ks == ({7: 1} if plan.reason == "exploring" else {7: 0}) for plan in plans)
    accepting(controller, 7, 0.9, windows=60)  # drafting again, it turns out to agree
    assert controller.plan([7]).ks[7] > 0


def test_no_sequence_explores_where_drafting_would_not_pay_at_anyone_s_acceptance():
    controller = this_cpu(1, 0.05, explore_every=2)
    plans = [controller.plan([0]) for _ in range(8)]
    assert all(plan.ks == {0: 0} and plan.reason == "goodput" for plan in plans)
