"""Bucketing the target's wall time: what the coordinator and IPC cost, apart from waiting for the draft."""

import random

import pytest

from pipeline.runtime.critical_path import intersect, length, merged, split_lines, split_target_time, subtract
from workers.protocol.messages import Span

MS = 1e-3


def span(name: str, start_ms: float, end_ms: float, lane: str = "") -> Span:
    return Span(name, lane, start_ms * MS, (end_ms - start_ms) * MS, 0, 0)


def test_a_miss_splits_into_the_targets_messages_the_coordinator_the_draft_and_the_wire():
    target = [span("verify", 0, 8), span("pack", 8, 8.1), span("send", 8.1, 8.2), span("idle", 8.2, 12.0),
              span("recv", 12.0, 12.05), span("unpack", 12.05, 12.1), span("verify", 12.1, 20)]
    coordinator = [span("wait", 0, 8.3), span("take", 8.3, 8.4), span("schedule", 8.4, 8.5),
                   span("send draft", 8.42, 8.48), span("wait", 8.5, 11.7), span("recv draft", 11.7, 11.75),
                   span("schedule", 11.75, 11.9), span("verify", 8.0, 20, lane="target requests")]
    draft = [span("idle", 0, 8.55), span("unpack", 8.55, 8.6), span("draft", 8.6, 11.5), span("send", 11.5, 11.6)]
    split = split_target_time(target, coordinator, draft, (0.0, 20 * MS))
    assert split.compute_s == pytest.approx(15.9 * MS)
    assert split.target_messages_s == pytest.approx(0.3 * MS)
    assert split.coordinator_s == pytest.approx(0.4 * MS)  # take, schedule (its send inside), recv, schedule
    assert split.draft_compute_s == pytest.approx(2.9 * MS)
    assert split.draft_messages_s == pytest.approx(0.15 * MS)
    # on the wire: 8.2-8.3 to the coordinator, 8.5-8.55 to the draft, 11.6-11.7 back, 11.9-12.0 to the target
    assert split.in_flight_s == pytest.approx(0.35 * MS)
    assert split.coordination_s == pytest.approx((0.3 + 0.4 + 0.15 + 0.35) * MS)
    parts = (split.compute_s, split.target_messages_s, split.coordinator_s, split.draft_compute_s,
             split.draft_messages_s, split.in_flight_s)
    assert sum(parts) == pytest.approx(split.wall_s)


def test_the_coordinator_running_beside_a_drafting_draft_counts_as_the_coordinator():
    """They share a core: while the coordinator runs, the draft the target waits for stands still."""
    target = [span("idle", 0, 10)]
    split = split_target_time(target, [span("take", 2, 3)], [span("speculate", 0, 10)], (0.0, 10 * MS))
    assert split.coordinator_s == pytest.approx(1 * MS)
    assert split.draft_compute_s == pytest.approx(9 * MS)


def test_only_the_traced_window_counts_and_request_lanes_are_not_work():
    target = [span("idle", -5, 2), span("chained", 2, 9), span("send", 9, 12)]
    coordinator = [span("chained", 0, 10, lane="target requests (chained)")]
    split = split_target_time(target, coordinator, [], (0.0, 10 * MS))
    assert split.wall_s == pytest.approx(10 * MS)
    assert split.compute_s == pytest.approx(7 * MS)
    assert split.target_messages_s == pytest.approx(1 * MS)
    assert split.coordinator_s == 0 and split.in_flight_s == pytest.approx(2 * MS)


def test_the_summary_names_each_bucket_as_a_share_of_the_wall():
    split = split_target_time([span("verify", 0, 9), span("send", 9, 10)], [], [], (0.0, 10 * MS))
    first, second = split_lines(split)
    assert first == "target's wall: compute 90.0%, waiting for the draft 0.0%, coordinator and IPC 10.0%"
    assert "its own message handling 10.0%" in second and "in flight 0.0%" in second


def test_interval_arithmetic_agrees_with_counting_points():
    generator = random.Random(7)

    def random_set() -> list[tuple[float, float]]:
        return merged([(a, a + generator.randint(1, 6)) for a in generator.sample(range(40), 8)])

    def points(intervals) -> set[int]:
        return {x for start, end in intervals for x in range(int(start), int(end))}

    for _ in range(200):
        a, b = random_set(), random_set()
        assert points(intersect(a, b)) == points(a) & points(b)
        assert points(subtract(a, b)) == points(a) - points(b)
        assert length(intersect(a, b)) + length(subtract(a, b)) == length(a)
