"""The pieces of `specpipe profile` that need no process: clock alignment, span bookkeeping, trace format."""

import json

import pytest

from pipeline.cli.profile import overlap_length, self_times, union_length
from pipeline.runtime.tracing import ClockOffset, ProcessSpans, chrome_trace, estimate_offset
from workers.protocol.codec import decode, encode
from workers.protocol.limits import MAX_TRACE_SPANS
from workers.protocol.messages import Span, TraceSpans
from workers.spans import SpanRecorder


def test_offset_comes_from_the_probe_with_the_shortest_round_trip():
    true_offset = 5.0  # the worker's clock runs 5 s ahead of the coordinator's
    probes = []
    # (send, time the worker read its clock, receive) on the coordinator's clock: uneven legs
    for sent, read, received in [(0.0, 0.004, 0.005), (1.0, 1.0001, 1.0003), (2.0, 2.0019, 2.002)]:
        probes.append((sent, read + true_offset, received))
    estimate = estimate_offset(probes)
    assert estimate.error_s == pytest.approx(0.00015)  # half the shortest round trip (0.3 ms)
    assert abs(estimate.offset_s - true_offset) <= estimate.error_s
    assert estimate.offset_s == pytest.approx(true_offset - 0.00005)  # read 50 us before the midpoint


def test_offset_needs_probes_that_came_back_after_they_left():
    with pytest.raises(ValueError, match="no clock probes"):
        estimate_offset([])
    with pytest.raises(ValueError, match="before it was sent"):
        estimate_offset([(2.0, 0.0, 1.0)])


def test_aligned_spans_are_on_the_coordinators_clock():
    process = ProcessSpans("target", 7, [Span("verify", "", 105.0, 0.5, 0, 3)], ClockOffset(100.0, 1e-4))
    (span,) = process.aligned()
    assert span.start_s == 5.0 and span.duration_s == 0.5 and span.name == "verify"


def test_recorder_keeps_nothing_until_started_and_counts_what_overflows():
    recorder = SpanRecorder()
    recorder.add("idle", 0.0, 1.0)
    assert recorder.collect() == ([], 0)
    recorder.start(capacity=2)
    for i in range(5):
        recorder.add("draft", i, i + 0.5, seq_id=1, size=3)
    spans, dropped = recorder.collect()
    assert [s.start_s for s in spans] == [0, 1] and dropped == 3
    assert spans[0] == Span("draft", "", 0, 0.5, 1, 3)
    recorder.add("draft", 9, 10)  # collect stopped it
    assert recorder.collect() == ([], 0)
    with pytest.raises(ValueError, match="between 1 and"):
        recorder.start(MAX_TRACE_SPANS + 1)


def test_spans_cross_the_wire_as_typed_messages():
    message = TraceSpans([Span("verify", "", 1.5, 0.25, 3, 4), Span("idle", "", 2.0, 0.1, -1, 0)], dropped=2)
    assert decode(encode(message)) == message


def test_self_time_takes_nested_spans_out_of_their_parent():
    spans = [Span("schedule", "", 0.0, 10.0, -1, 0), Span("send", "", 2.0, 3.0, -1, 0),
             Span("send", "", 6.0, 1.0, -1, 0), Span("wait", "", 10.0, 5.0, -1, 0)]
    assert self_times(spans) == [6.0, 3.0, 1.0, 5.0]


def test_interval_union_and_overlap():
    assert union_length([(0, 2), (1, 3), (5, 6)]) == 4
    assert overlap_length([(0, 2), (4, 6)], [(1, 5)]) == 2
    assert overlap_length([(0, 1)], [(2, 3)]) == 0


def test_chrome_trace_has_a_named_track_per_process_and_lane():
    coordinator = ProcessSpans("coord", 1, [Span("wait", "", 10.0, 0.002, -1, 0),
                                            Span("verify", "target requests", 10.0, 0.004, 0, 3)])
    target = ProcessSpans("target", 2, [Span("verify", "", 110.001, 0.003, 0, 3)], ClockOffset(100.0, 5e-5))
    trace = json.loads(json.dumps(chrome_trace([coordinator, target], origin_s=10.0, metadata={"mode": "serial"})))
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names[1] == "coord (pid 1)" and names[2].startswith("target (pid 2), clock offset +100000000")
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert threads == {(1, 0): "main loop", (1, 1): "target requests", (2, 0): "main loop"}
    complete = [e for e in events if e["ph"] == "X"]
    worker_verify = next(e for e in complete if e["pid"] == 2)
    assert worker_verify["ts"] == pytest.approx(1000.0) and worker_verify["dur"] == pytest.approx(3000.0)
    assert worker_verify["args"] == {"seq": 0, "tokens": 3}
    assert all(isinstance(e["ts"], float) and e["dur"] >= 0 for e in complete)
    assert trace["otherData"] == {"mode": "serial"}


def test_theory_per_token_uses_mean_round_trips_acceptance_and_misses():
    from types import SimpleNamespace

    from pipeline.cli.profile import Profile, measured_ms_per_token, predicted_ms_per_token

    lane = [Span("verify", "target requests", 0.0, 0.004, 0, 2), Span("verify", "target requests", 1.0, 0.006, 0, 2),
            Span("draft", "draft requests", 0.0, 0.001, 0, 2), Span("draft", "draft requests", 1.0, 0.001, 0, 2),
            Span("draft", "draft requests", 2.0, 0.005, 0, 3)]  # a speculation of another size: not T_d(k)
    stats = SimpleNamespace(verifications=10, accepted=14, predraft_hits=6, predraft_misses=4,
                            token_times=[1.0, 1.002, 1.004, 1.012])
    sequence = SimpleNamespace(stats=stats, generated=[1, 2, 3, 4])
    overlap = Profile([ProcessSpans("coord", 1, lane)], [sequence], 0.0, 1.0, None, "overlap", 2)
    # cycle = max(T_v 5 ms, T_d 1 ms) + miss rate 0.4 * T_d = 5.4 ms over E[tau] = (14 + 10) / 10 tokens
    assert predicted_ms_per_token(overlap) == pytest.approx(5.4 / 2.4)
    serial = Profile([ProcessSpans("coord", 1, lane)], [sequence], 0.0, 1.0, None, "serial", 2)
    assert predicted_ms_per_token(serial) == pytest.approx(6.0 / 2.4)
    assert measured_ms_per_token(overlap) == pytest.approx(4.0)  # 12 ms for the 3 tokens after the first
