"""The bench's arithmetic on hand-made generations at concurrency 1: latencies, acceptance by position,
predictions."""

import pytest

from pipeline.algorithm.engine import Trip
from pipeline.bench.figures import figures, histogram, inter_token_latencies, per_position_acceptance, percentile
from pipeline.bench.records import Generation, one
from pipeline.bench.theory import predict


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(range(101)), 90) == pytest.approx(90)


def test_tokens_committed_together_are_zero_apart():
    generation = Generation([1, 2, 3, 4], 0.05, [0.02, 0.03, 0.03, 0.05])
    assert inter_token_latencies(generation) == pytest.approx([0.01, 0.0, 0.02])


def test_per_position_acceptance_counts_only_positions_reached():
    # windows of 3: accepted 3, 1, 0 and a last window of 1 that was accepted
    rates = per_position_acceptance([3, 1, 0, 1], [3, 3, 3, 1])
    assert rates == pytest.approx([3 / 4, 1 / 2, 1 / 1])
    assert histogram([3, 1, 0, 1], 3) == [1, 2, 0, 1]


def speculative_run(trips: list[Trip]):
    # 9 tokens from 3 verifications (accepted 2, 1, 2 of windows of 2, plus a bonus each) after a 1-token prefill
    return one(Generation(list(range(10)), 0.2, [0.05] + [0.05 + 0.015 * i for i in range(1, 10)], drafted=6,
                          accepted=5, verifications=3, accepted_lengths=[2, 1, 2], window_sizes=[2, 2, 2],
                          predraft_hits=2, predraft_misses=1),
               busy_s={"target": 0.15, "draft": 0.03}, ipc_s={"target": 0.01, "draft": 0.005}, coordinator_s=0.004,
               trips=trips)


def test_figures_add_up():
    run = speculative_run([])
    result = figures("overlap k=2", "overlap", 2, "specpipe", [run, run], [])
    assert result.tokens == 20 and result.drafted == 12 and result.accepted == 10 and result.verifications == 6
    assert result.acceptance_rate == pytest.approx(10 / 12)
    assert result.mean_acceptance_length == pytest.approx((10 + 6) / 6)  # the bonus token counts
    assert result.tokens_per_s == pytest.approx(20 / 0.4)
    assert result.decode_tokens_per_s == pytest.approx(18 / (2 * (0.2 - 0.05)))
    assert result.predraft_hit_rate == pytest.approx(2 / 3)
    assert result.mean_drafted_length == pytest.approx(12 / 6)  # no plain steps: the window size
    assert (result.concurrency, result.rounds, result.sequences) == (1, 2, 2)
    target = result.time_split_s["target"]
    assert target["busy"] + target["ipc"] + target["idle"] == pytest.approx(result.wall_s)


def test_prediction_follows_the_formula():
    serial_trips = [Trip("draft", "draft", 2, 0.004, 0.005), Trip("target", "verify", 2, 0.011, 0.012)]
    baseline = figures("target-only", "target-only", None, "specpipe",
                       [one(Generation(list(range(10)), 0.2, [0.05 + 0.01 * i for i in range(10)]),
                            trips=[Trip("target", "decode", 0, 0.009, 0.01)])], [])
    serial_run = speculative_run(serial_trips)
    overlap = figures("overlap k=2", "overlap", 2, "specpipe", [speculative_run([])], [])
    overlap.speedup_vs_target_only = 1.2
    predict(overlap, baseline, 0.010, [serial_run])
    tau = overlap.mean_acceptance_length
    cycle = max(0.012, 0.005) + (1 / 3) * 0.005
    expected = (0.05 + 9 * 0.010) / (0.05 + 9 * cycle / tau)
    assert overlap.predicted_speedup == pytest.approx(expected)
    assert overlap.measured_over_predicted == pytest.approx(1.2 / expected)
    serial = figures("serial k=2", "serial", 2, "specpipe", [serial_run], [])
    predict(serial, baseline, 0.010, [serial_run])
    assert serial.theory["cycle_ms"] == pytest.approx(17.0)
