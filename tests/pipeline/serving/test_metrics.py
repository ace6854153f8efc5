from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.serving.metrics import ServingMetrics


def values(metrics: ServingMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_slow_draft_switch_shows_while_it_is_off_and_counts_each_time_it_went_off():
    metrics = ServingMetrics("target", k=3)
    assert values(metrics)["specpipe:spec_decode_draft_too_slow"] == 0
    assert values(metrics)["specpipe:spec_decode_speculation_switched_off_total"] == 0
    metrics.draft_state(True, 1)
    assert values(metrics)["specpipe:spec_decode_draft_too_slow"] == 1
    metrics.draft_state(True, 1)  # still the same spell: counted once
    metrics.draft_state(False, 1)
    assert values(metrics)["specpipe:spec_decode_draft_too_slow"] == 0
    metrics.draft_state(True, 2)
    assert values(metrics)["specpipe:spec_decode_speculation_switched_off_total"] == 2
