"""What `GET /metrics` shows (Prometheus text format through prometheus_client), in vLLM's names and spirit.

Acceptance rate and mean acceptance length are one PromQL division each:
    rate(specpipe:spec_decode_num_accepted_tokens_total[1m]) / rate(specpipe:spec_decode_num_draft_tokens_total[1m])
    rate(specpipe:spec_decode_num_emitted_tokens_total[1m]) / rate(specpipe:spec_decode_num_drafts_total[1m])
(a draft is one verified window; emitted = accepted + one token of the target's own per window).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from pipeline.algorithm.sequence import SequenceStats

PREFIX = "specpipe:"
# seconds; fine at the low end, where a CPU pipeline's per-token figures lie
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                   0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


@dataclass
class SpecCounts:
    """A sequence's speculation figures as last reported, so that each report adds only what is new."""

    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    windows: int = 0  # entries of accepted_lengths counted
    hits: int = 0
    misses: int = 0


class ServingMetrics:
    """The server's metrics, in a registry of its own (two servers in one process, as in tests, do not mix)."""

    def __init__(self, model_name: str, k: int = 0) -> None:
        disable_created_metrics()  # no *_created series beside each counter (vLLM does the same)
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, [*labels, *extra], registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, [*labels], buckets=buckets, registry=self.registry).labels(**labels)

        gauge = lambda name, doc: Gauge(PREFIX + name, doc, [*labels], registry=self.registry).labels(**labels)  # noqa: E731
        self.running = gauge("num_requests_running", "Sequences the workers are decoding.")
        self.waiting = gauge("num_requests_waiting", "Requests queued for a free sequence slot.")
        self.ttft = histogram("time_to_first_token_seconds", "From a request's arrival to its first token.",
                              LATENCY_BUCKETS)
        self.inter_token = histogram("inter_token_latency_seconds", "Between two tokens of one request (tokens "
                                     "committed together share the gap evenly).", LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "From a request's arrival to its last byte.",
                             REQUEST_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens of admitted requests.").labels(**labels)
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated.").labels(**labels)
        self._success = counter("request_success_total", "Requests answered, by finish reason (stop, length, "
                                "abort: the client left, error).", ("finished_reason",))
        self.drafts = counter("spec_decode_num_drafts_total", "Windows of drafted tokens verified.").labels(**labels)
        self.draft_tokens = counter("spec_decode_num_draft_tokens_total", "Drafted tokens verified.").labels(**labels)
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens_total", "Drafted tokens accepted.").labels(
            **labels)
        self.emitted_tokens = counter("spec_decode_num_emitted_tokens_total", "Tokens verifications gave: the "
                                      "accepted drafted ones plus the target's own, one per window.").labels(**labels)
        self._accepted_per_position = counter("spec_decode_num_accepted_tokens_per_pos_total", "Drafted tokens "
                                              "accepted, by position in the window (0 = first).", ("position",))
        self.predraft_hits = counter("spec_decode_predraft_hits_total", "Verifications whose next window had been "
                                     "drafted ahead (overlap).").labels(**labels)
        self.predraft_misses = counter("spec_decode_predraft_misses_total", "Verifications whose next window had "
                                       "to be drafted after them (overlap).").labels(**labels)
        self.draft_off = gauge("spec_decode_draft_too_slow", "1 while the goodput controller has speculation switched "
                               "off because the draft got too slow to pay (a busy host, a starved device), else 0.")
        self.draft_off_events = counter("spec_decode_speculation_switched_off_total", "Times the goodput "
                                        "controller switched speculation off for a slow draft.").labels(**labels)
        self._off_events_seen = 0
        self._labels = labels
        self._positions: list[Counter] = []
        for position in range(k):  # shown from the start, at 0
            self._position(position)

    def finished(self, reason: str) -> None:
        self._success.labels(**self._labels, finished_reason=reason).inc()

    def speculation(self, stats: SequenceStats, seen: SpecCounts) -> None:
        """Adds what `stats` holds beyond `seen`, and moves `seen` up to it."""
        new_windows = stats.accepted_lengths[seen.windows :]
        self.drafts.inc(stats.verifications - seen.verifications)
        self.draft_tokens.inc(stats.drafted - seen.drafted)
        self.accepted_tokens.inc(stats.accepted - seen.accepted)
        self.emitted_tokens.inc(stats.accepted - seen.accepted + stats.verifications - seen.verifications)
        self.predraft_hits.inc(stats.predraft_hits - seen.hits)
        self.predraft_misses.inc(stats.predraft_misses - seen.misses)
        for accepted in new_windows:
            for position in range(accepted):
                self._position(position).inc()
        seen.verifications, seen.drafted, seen.accepted = stats.verifications, stats.drafted, stats.accepted
        seen.windows, seen.hits, seen.misses = len(stats.accepted_lengths), stats.predraft_hits, stats.predraft_misses

    def draft_state(self, off: bool, off_events: int) -> None:
        """The goodput controller's switch: on or off now, and how often it has gone off so far."""
        self.draft_off.set(1 if off else 0)
        self.draft_off_events.inc(max(0, off_events - self._off_events_seen))
        self._off_events_seen = max(self._off_events_seen, off_events)

    def _position(self, position: int) -> Counter:
        while position >= len(self._positions):
            self._positions.append(self._accepted_per_position.labels(**self._labels, position=str(len(self._positions))))
        return self._positions[position]
