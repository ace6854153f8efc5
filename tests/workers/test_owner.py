"""A worker serves one coordinator at a time."""

from workers.owner import OWNER_QUIET_S, Owner


def test_a_second_coordinator_is_refused_while_the_first_holds_sequences_and_is_active():
    owner = Owner()
    assert owner.refusal(b"a", held=0, now=0.0) is None
    owner.take(b"a", pid=11, now=0.0)
    owner.saw(b"a", now=1.0)
    refusal = owner.refusal(b"b", held=2, now=2.0)
    assert refusal is not None and "another coordinator (pid 11, 2 sequence(s), last request 1.0 s ago)" in refusal
    assert owner.refusal(b"a", held=2, now=2.0) is None  # its own Hello resets it
    assert owner.refusal(b"b", held=0, now=2.0) is None  # nothing held: nothing to protect


def test_a_coordinator_silent_for_the_quiet_period_is_replaced():
    owner = Owner()
    owner.take(b"a", pid=11, now=0.0)
    owner.saw(b"b", now=OWNER_QUIET_S)  # another client's messages do not keep the owner alive
    assert owner.refusal(b"b", held=1, now=OWNER_QUIET_S) is None


def test_the_owner_is_kept_while_it_speaks_within_the_quiet_period_and_replaced_once_it_is_over():
    owner = Owner()
    owner.take(b"a", pid=11, now=0.0)
    owner.saw(b"a", now=3.0)  # its own requests keep it the owner
    assert owner.refusal(b"b", held=1, now=3.0 + OWNER_QUIET_S - 0.01) is not None
    assert owner.refusal(b"b", held=1, now=3.0 + OWNER_QUIET_S) is None


def test_every_other_request_is_the_owners_alone():
    owner = Owner()
    assert "no coordinator has said Hello" in owner.stranger(b"a", "DraftRequest")
    owner.take(b"a", pid=11, now=0.0)
    assert owner.stranger(b"a", "DraftRequest") is None
    refusal = owner.stranger(b"b", "TraceCollect")
    assert refusal is not None and "serves another coordinator (pid 11)" in refusal and "TraceCollect" in refusal
