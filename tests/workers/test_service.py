"""The target goes on from a verification with the window drafted for its outcome (VerifyNext)."""

import pytest

from workers.model import ModelRunner
from workers.models import TARGET_DIR
from workers.protocol.codec import decode, encode
from workers.protocol.messages import ErrorReply, Skipped, VerifyNext, VerifyRequest, VerifyResult
from workers.service import WorkerService

PROMPT = [12, 873, 45, 9, 301, 77]


@pytest.fixture
def target():
    runner = ModelRunner.from_checkpoint(TARGET_DIR, dtype="float32", n_slots=2, max_seq_len=64)
    return WorkerService("target", runner)


def ask(service: WorkerService, message: object) -> object:
    return decode(encode(service.handle(decode(encode(message)))))


def test_verify_next_continues_with_the_branch_for_the_outcome(target):
    first = ask(target, VerifyRequest(1, 0, 0, PROMPT, 0))  # prefill: its next token is the outcome
    outcome = first.next_token
    chained = ask(target, VerifyNext(2, 0, 1, [0, 0], [outcome + 1, outcome], [[5, 6], [7, 8, 9]]))
    assert isinstance(chained, VerifyResult) and chained.request_id == 2

    # exactly what verifying that window in a request of its own gives
    fresh = WorkerService("target", ModelRunner.from_checkpoint(TARGET_DIR, dtype="float32", max_seq_len=64))
    ask(fresh, VerifyRequest(1, 0, 0, PROMPT, 0))
    plain = ask(fresh, VerifyRequest(2, 0, len(PROMPT), [outcome, 7, 8, 9], 3))
    assert (chained.accepted, chained.next_token, chained.cached) == (plain.accepted, plain.next_token, plain.cached)


def test_verify_next_skips_when_no_branch_is_the_outcome(target):
    first = ask(target, VerifyRequest(1, 0, 0, PROMPT, 0))
    skipped = ask(target, VerifyNext(2, 0, 1, [0], [(first.next_token + 1) % 100], [[5, 6]]))
    assert skipped == Skipped(2, 0)
    # nothing was read: the sequence goes on from the first verification
    assert ask(target, VerifyRequest(3, 0, len(PROMPT), [first.next_token], 0)).cached == len(PROMPT) + 1


def test_verify_next_must_follow_the_last_verification(target):
    ask(target, VerifyRequest(1, 0, 0, PROMPT, 0))
    refused = ask(target, VerifyNext(9, 0, 7, [0], [1], [[5]]))
    assert isinstance(refused, ErrorReply) and not refused.fatal and "last verification of it was 1" in refused.message
    refused = ask(target, VerifyNext(9, 0, 1, [0, 0], [1], [[5], [6]]))  # ragged branches
    assert isinstance(refused, ErrorReply) and not refused.fatal
