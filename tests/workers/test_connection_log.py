"""A worker's connection log says a repeated event once per quiet period, with a count."""

from workers.connection_log import QUIET_S, RepeatFilter

REFUSED = "refused a client: its CURVE key is not among --curve-clients"


def test_a_client_retrying_every_100_ms_makes_one_line_per_quiet_period():
    lines, now = [], [0.0]
    log = RepeatFilter(lines.append, clock=lambda: now[0])
    assert QUIET_S == 10.0
    for tenth in range(206):  # a retry every 100 ms from 0 s to 20.5 s
        now[0] = tenth / 10
        log(REFUSED)
    log.flush()  # the retries stop
    every = f"{int(QUIET_S * 10)} times in the last {QUIET_S:.0f} s"
    assert lines == [REFUSED, f"{REFUSED} ({every})", f"{REFUSED} ({every})", f"{REFUSED} (5 more time(s) after that)"]


def test_other_events_pass_at_once_and_report_the_repeats_held_back():
    lines, now = [], [0.0]
    log = RepeatFilter(lines.append, clock=lambda: now[0])
    log(REFUSED)
    log(REFUSED)
    log(REFUSED)
    log("a coordinator connected")
    assert lines == [REFUSED, f"{REFUSED} (2 more time(s) after that)", "a coordinator connected"]
