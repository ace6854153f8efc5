"""The target goes on from a verification with the window drafted for its outcome (VerifyNext)."""

import pytest

from workers.bundled import TARGET_DIR
from workers.model import ModelRunner
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


# --- batches: several sequences in one pass, each answered on its own ---------------------------------


def test_a_target_batch_answers_each_sequence_as_its_own_request_would(target):
    from workers.protocol.messages import PrefillChunk, Prefilled, TargetBatch, TargetBatchResult

    batch = TargetBatch(10, [PrefillChunk(1, 0, 0, PROMPT[:4])], [VerifyRequest(2, 1, 0, PROMPT, 0, prompt=True)], [])
    result = ask(target, batch)
    assert isinstance(result, TargetBatchResult) and result.request_id == 10 and not result.errors
    assert result.prefilled == [Prefilled(1, 0, 4)] and result.rows == 4 + len(PROMPT)
    (verified,) = result.verified
    fresh = WorkerService("target", ModelRunner.from_checkpoint(TARGET_DIR, dtype="float32", max_seq_len=64))
    alone = ask(fresh, VerifyRequest(2, 1, 0, PROMPT, 0, prompt=True))
    assert (verified.seq_id, verified.next_token, verified.cached) == (1, alone.next_token, alone.cached)


def test_one_bad_item_fails_alone_and_the_rest_of_the_batch_is_served(target):
    from workers.protocol.messages import TargetBatch

    bad = VerifyRequest(1, 0, 0, [10**6], 0)  # a token outside the vocabulary
    good = VerifyRequest(2, 1, 0, PROMPT, 0)
    result = ask(target, TargetBatch(3, [], [bad, good], []))
    assert [e.request_id for e in result.errors] == [1] and "token ids must lie in" in result.errors[0].message
    assert not result.errors[0].fatal and [v.request_id for v in result.verified] == [2]
    again = ask(target, TargetBatch(4, [], [VerifyRequest(5, 1, len(PROMPT), [result.verified[0].next_token], 0)], []))
    assert [v.request_id for v in again.verified] == [5]  # the worker goes on serving


def test_a_draft_batch_drafts_every_sequence_as_alone():
    from workers.bundled import DRAFT_DIR
    from workers.protocol.messages import DraftBatch, DraftRequest, SpeculateRequest

    def service():
        return WorkerService("draft", ModelRunner.from_checkpoint(DRAFT_DIR, dtype="float32", n_slots=3,
                                                                  max_seq_len=64))

    requests = [DraftRequest(1, 0, 0, PROMPT, 3, alternatives=2), DraftRequest(2, 1, 0, PROMPT[:3], 1)]
    speculation = SpeculateRequest(3, 2, 0, PROMPT, [4], [99], 2, 3, alternatives=2)
    batched = ask(service(), DraftBatch(9, requests, [speculation]))
    assert not batched.errors and batched.steps == 4  # the first pass, then one per drafted token at most
    # the feeds (6 + 3 + 6 rows), then per pass one row for the first draft and the 3 branches (1 fork, 2 guesses)
    assert batched.rows == 15 + (1 + 3) + (1 + 3) + 3
    for request, made in zip(requests, batched.drafted):
        alone = ask(service(), request)
        assert (made.tokens, made.alternatives, made.cached) == (alone.tokens, alone.alternatives, alone.cached)
    alone = ask(service(), speculation)
    (made,) = batched.speculated
    assert (made.heads, made.tokens, made.cached) == (alone.heads, alone.tokens, alone.cached)
