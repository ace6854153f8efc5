"""The goodput controller on its own: costs and acceptances in, k per sequence out, no workers or clocks.

Each test feeds the costs and acceptance rates of one situation and checks what a user would notice:
how much each sequence drafts, the predicted speedup, and when speculation switches itself off."""

import random

import pytest

from pipeline.speculation import (
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


def speedup(plan: SpeculationPlan) -> float:
    assert plan.tokens_per_s is not None and plan.baseline_tokens_per_s is not None
    return plan.tokens_per_s / plan.baseline_tokens_per_s


def test_expected_tokens_counts_the_bonus_token():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 4) == 5.0


def test_step_costs_interpolate_between_and_stay_flat_below_observed_row_counts():
    costs = StepCosts()
    assert not costs.observed and costs.estimate(3) is None
    for count, seconds in [(2, 1.0), (4, 2.0), (8, 3.0)]:
        costs.observe(count, seconds)
    assert costs.observed
    assert costs.estimate(4) == 2.0
    assert costs.estimate(3) == pytest.approx(1.5)
    assert costs.estimate(6) == pytest.approx(2.5)
    assert costs.estimate(1) == 1.0  # never cheaper than the fewest rows seen


def test_step_costs_extrapolate_above_the_largest_row_count():
    costs = StepCosts()
    costs.observe(4, 2.0)
    assert costs.estimate(8) == pytest.approx(4.0)  # one point: linear through the origin
    assert costs.estimate(2) == 2.0
    costs.observe(8, 3.0)
    assert costs.estimate(12) == pytest.approx(4.0)  # the slope of the largest two
    falling = StepCosts()
    falling.observe(2, 2.0)
    falling.observe(4, 1.0)
    assert falling.estimate(10) == pytest.approx(1.0)  # a slope never below zero


def test_step_costs_average_repeated_observations():
    costs = StepCosts(smoothing=0.3)
    costs.observe(2, 1.0)
    costs.observe(2, 2.0)
    assert costs.estimate(2) == pytest.approx(1.3)
    costs.observe(2, 2.0)
    assert costs.estimate(2) == pytest.approx(1.51)
    sweep = [(1, 0.5), (3, 1.0), (7, 1.2)]
    for count, seconds in sweep:
        costs.observe(count, seconds)
    assert costs.estimates(0, 12) == pytest.approx([costs.estimate(count) for count in range(13)])


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
    accepting(controller, 1, 0.5)
    # target 3 + 1 rows: 6 ms; drafting 2 steps of 1 row: 1 ms; tokens 1.75 + 1
    assert controller.evaluate({1: 2, 2: 0}) == pytest.approx(2.75 / (7 * MS))


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


def test_costs_are_measured_first_then_other_row_counts_are_explored():
    controller = GoodputController(3, "overlap", clock=Clock(), explore_every=4)
    ids = [1, 2]
    first = controller.plan(ids, branches=2)
    assert first.reason == "warming up" and first.ks == {1: 3, 2: 3}
    assert first.tokens_per_s is None and first.baseline_tokens_per_s is None
    controller.observe_target(8, 9 * MS)
    second = controller.plan(ids, branches=2)
    assert second.reason == "warming up" and second.baseline_tokens_per_s is not None
    controller.observe_draft(4, 3, 3 * 1.0 * MS)
    reasons, explored = [], []
    for _ in range(14):
        plan = controller.plan(ids, branches=2)
        reasons.append(plan.reason)
        if plan.reason == "exploring":
            explored.append(plan.ks)
    # plans 4, 8, 12, 16 explore: uniform k cycling through 0..cap
    assert [i + 3 for i, reason in enumerate(reasons) if reason == "exploring"] == [4, 8, 12, 16]
    assert explored == [{1: 0, 2: 0}, {1: 1, 2: 1}, {1: 2, 2: 2}, {1: 3, 2: 3}]
    assert set(reasons) == {"goodput", "exploring"}


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
