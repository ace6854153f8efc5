"""What speculative decoding should gain, from measured acceptance and measured step costs.

Per generated token, target-only pays one decode step T_t. A verification yields E[tau] tokens on
average (the mean acceptance length, bonus token included). Step costs are medians of the round trips
the coordinator saw (compute + IPC), taken from the same run:

    serial    one cycle = k draft steps + one verification:   T_cycle = T_d(k) + T_v(k)
    overlap   the draft drafts ahead during the verification; a miss (no pre-drafted window fits the
              outcome) leaves the target waiting for a fresh draft:
                                                              T_cycle = max(T_v(k), T_s) + m * T_d(k)

with T_d(k) the round trip of a k-token draft request, T_s that of a speculation (all branches drafted
ahead for one verification; the overlap run's own median) and m the measured pre-draft miss rate. The
prompt's prefill P (target-only TTFT) is the same in every mode, so over N tokens per sequence

    predicted speedup = (P + (N - 1) * T_t) / (P + (N - 1) * T_cycle / E[tau]).

That holds for one sequence at a time (concurrency 1). At a higher concurrency the target verifies
several sequences' windows in one step and the cycle above no longer describes it; there the goodput
controller's own prediction is used (`predict_concurrent`), which it makes for fixed-k plans too.
"""

from __future__ import annotations

import statistics

from pipeline.bench.figures import Figures
from pipeline.bench.records import Round


def median_round_trip(rounds: list[Round], role: str, kind: str, size: int | None = None) -> float | None:
    trips = [t.round_trip_s for r in rounds for t in r.trips
             if t.role == role and t.kind == kind and (size is None or t.size == size)]
    return statistics.median(trips) if trips else None


def predict(result: Figures, baseline: Figures, decode_step_s: float | None,
            serial_runs: list[Round] | None, own_runs: list[Round] | None = None) -> None:
    """Fills result.predicted_speedup and result.theory for a serial or overlap configuration at
    concurrency 1 (baseline: target-only at concurrency 1, serial_runs: serial at the same k)."""
    if result.mode not in ("serial", "overlap") or not result.mean_acceptance_length or not serial_runs:
        return
    k = result.k
    draft_s = median_round_trip(serial_runs, "draft", "draft", k)
    verify_s = median_round_trip(serial_runs, "target", "verify", k)
    if decode_step_s is None or draft_s is None or verify_s is None:
        return
    if result.mode == "serial":
        cycle = draft_s + verify_s
        miss_rate = None
    else:
        miss_rate = 1.0 - (result.predraft_hit_rate or 0.0)
        ahead_s = median_round_trip(own_runs or [], "draft", "speculate") or draft_s
        cycle = max(verify_s, ahead_s) + miss_rate * draft_s
    prefill = baseline.ttft_s
    per_sequence = result.tokens / result.sequences
    predicted_wall = prefill + (per_sequence - 1) * cycle / result.mean_acceptance_length
    baseline_wall = prefill + (per_sequence - 1) * decode_step_s
    result.predicted_speedup = baseline_wall / predicted_wall
    if result.speedup_vs_target_only is not None:
        result.measured_over_predicted = result.speedup_vs_target_only / result.predicted_speedup
    result.theory = {"decode_step_ms": decode_step_s * 1e3, "draft_k_ms": draft_s * 1e3,
                     "verify_k_ms": verify_s * 1e3, "cycle_ms": cycle * 1e3, "prefill_ms": prefill * 1e3,
                     "mean_acceptance_length": result.mean_acceptance_length}
    if miss_rate is not None:
        result.theory["miss_rate"] = miss_rate
        result.theory["speculate_ms"] = ahead_s * 1e3


def predict_concurrent(result: Figures) -> None:
    """At concurrency > 1: the goodput controller's predicted speedup, time-weighted over the configuration's
    rounds (Figures.speculation), where its scheduler made one; else no prediction."""
    if result.mode not in ("serial", "overlap"):
        return
    predicted = result.speculation.get("predicted_speedup")
    if not isinstance(predicted, (int, float)) or predicted <= 0:
        return
    result.predicted_speedup = float(predicted)
    if result.speedup_vs_target_only is not None:
        result.measured_over_predicted = result.speedup_vs_target_only / result.predicted_speedup
