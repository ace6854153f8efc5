"""The scheduler on its own: requests out, hand-written replies in, no workers, models or sockets.

Each test plays one scenario and checks the phase it leads to, what goes to each worker next, and the
statistics a user reads off a run."""

import pytest
import torch

from pipeline.algorithm.drafting import BranchBudget, Drafted, likeliest_outcomes
from pipeline.algorithm.scheduler import Scheduler
from pipeline.algorithm.sequence import Phase
from pipeline.config import DecodeConfig
from workers.protocol.messages import (
    DraftBatch,
    DraftRequest,
    DraftResult,
    Release,
    Skipped,
    SpeculateRequest,
    SpeculateResult,
    TargetBatch,
    TargetBatchResult,
    VerifyNext,
    VerifyRequest,
    VerifyResult,
    batch_items,
)
from workers.sampling import SamplingParams

VOCAB, EOS, CONTEXT = 50, 0, 64
PROMPT = [5, 6, 7]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scheduler(concurrency: int = 1, clock=None, **decode) -> Scheduler:
    config = DecodeConfig(**{"k_policy": "fixed", **decode})
    return Scheduler(config, VOCAB, {EOS}, CONTEXT, concurrency, clock=clock or Clock())


def next_item(s: Scheduler, role: str, unanswered: int = 0):
    """The one item of the next batch for `role` (these scenarios run one sequence at a time), or a control
    message, or None."""
    message = s.next_request(role, unanswered)
    if isinstance(message, TargetBatch):
        (item,) = [*message.prefills, *message.verifies, *message.continues]
        return item
    if isinstance(message, DraftBatch):
        (item,) = [*message.drafts, *message.speculations]
        return item
    return message


def verified(request: VerifyRequest, accepted: int, next_token: int) -> VerifyResult:
    """The target's answer: `accepted` drafted tokens kept, then `next_token`; its cache ends before it."""
    cached = request.start + len(request.feed) - request.drafted + accepted
    return VerifyResult(request.request_id, request.seq_id, accepted, next_token, cached, 0.001)


def drafted(request: DraftRequest, tokens: list[int]) -> DraftResult:
    alternatives = [[(t + 1) % VOCAB] for t in tokens]
    return DraftResult(request.request_id, request.seq_id, tokens, None, alternatives,
                       request.start + len(request.feed) + len(tokens) - 1, 0.001)


def drafted_ahead(request: SpeculateRequest, guesses: list[int], windows: list[list[int]]) -> SpeculateResult:
    """Branches in the request's order (rejections, then bonus guesses), each with its window."""
    heads = request.heads + guesses
    return SpeculateResult(request.request_id, request.seq_id, heads, windows, None,
                           [[[1]] * request.count for _ in heads], request.start + len(request.feed), 0.001)


def prefill(s: Scheduler, seq_id: int = 0, first: int = 20) -> VerifyRequest:
    request = next_item(s, "target")
    assert isinstance(request, VerifyRequest) and request.start == 0 and request.drafted == 0
    s.on_reply(verified(request, 0, first))
    return request


# --- the pieces ---------------------------------------------------------------------------------------


def test_likeliest_outcomes_alternate_bonus_guesses_and_rejections_by_rank():
    window = Drafted([10, 11, 12], None, [[30, 31], [32, 33], [34, 35]])
    assert likeliest_outcomes(window, committed=7, budget=1) == ([], 1)
    # all accepted with the top bonus guess, then rejected at each position with its runner-up, then a
    # second bonus guess, then third choices
    assert likeliest_outcomes(window, committed=7, budget=5) == ([(7, 30), (8, 32), (9, 34)], 2)
    assert likeliest_outcomes(window, committed=7, budget=8) == ([(7, 30), (8, 32), (9, 34), (7, 31), (8, 33),
                                                                 (9, 35)], 2)
    plain_step = Drafted([], None, [])  # nothing to reject: every branch guesses the one token
    assert likeliest_outcomes(plain_step, committed=7, budget=12) == ([], 4)


def test_branch_budget_grows_by_one_and_shrinks_by_two_within_its_bounds():
    budget = BranchBudget(cap=6)
    assert budget.value == 4
    for expected in (5, 6, 6):
        budget.finished_in_time()
        assert budget.value == expected
    for expected in (4, 2, 1, 1):
        budget.outlasted()
        assert budget.value == expected
    assert BranchBudget(cap=1).value == 1


# --- phases -------------------------------------------------------------------------------------------


def test_admission_is_bounded_by_concurrency_and_in_order():
    s = scheduler(concurrency=2, mode="target-only", max_new_tokens=1)
    sequences = [s.add(i, PROMPT) for i in range(3)]
    assert [q.phase for q in sequences] == [Phase.WAITING] * 3
    first = s.next_request("target")  # one batch: the two admitted prompts' prefills
    assert [r.seq_id for r in first.verifies] == [0, 1] and not first.prefills and not first.continues
    assert [q.phase for q in sequences[:2]] == [Phase.VERIFYING] * 2
    assert sequences[2].phase is Phase.WAITING and s.waiting == [sequences[2]]
    s.on_reply(verified(first.verifies[0], 0, 20))  # both finish (max_new_tokens=1): the waiting one goes in
    s.on_reply(verified(first.verifies[1], 0, 21))
    assert [next_item(s, "target"), next_item(s, "target")] == [Release(0), Release(1)]
    assert sequences[2].phase is Phase.WAITING  # admitted with the next batch, after the releases
    again = s.next_request("target")
    assert [r.seq_id for r in again.verifies] == [2] and sequences[2].phase is Phase.VERIFYING
    assert next_item(s, "draft") is None  # target-only: nothing for a draft, ever


def test_target_only_decodes_one_token_per_step_until_length_then_releases():
    clock = Clock()
    s = scheduler(mode="target-only", max_new_tokens=3, clock=clock)
    sequence = s.add(0, PROMPT)
    prefill(s, first=20)
    assert sequence.phase is Phase.READY and sequence.window.tokens == []
    for token, now in ((21, 101.0), (22, 102.0)):
        clock.now = now
        step = next_item(s, "target")
        assert step.feed == [sequence.tokens[-1]] and step.start == len(sequence.tokens) - 1 and step.drafted == 0
        s.on_reply(verified(step, 0, token))
    assert sequence.generated == [20, 21, 22] and sequence.finish_reason == "length"
    assert sequence.phase is Phase.FINISHED and sequence.stats.token_times == [100.0, 101.0, 102.0]
    assert sequence.stats.first_token_at - sequence.stats.started == 0.0
    assert not s.done  # the release is still to be sent
    assert next_item(s, "target") == Release(0) and next_item(s, "draft") is None
    assert s.done


def test_serial_drafts_then_verifies_then_drafts_again():
    s = scheduler(mode="serial", k=3)
    sequence = s.add(0, PROMPT)
    assert next_item(s, "draft") is None  # the prompt's prefill comes first
    prefill(s, first=20)
    assert sequence.phase is Phase.DRAFT_NEEDED and next_item(s, "target") is None
    draft = next_item(s, "draft")
    assert isinstance(draft, DraftRequest) and draft.start == 0 and draft.feed == PROMPT + [20] and draft.count == 3
    assert draft.alternatives == 0 and sequence.phase is Phase.DRAFTING  # serial bets on no corrections
    s.on_reply(drafted(draft, [21, 22, 23]))
    assert sequence.phase is Phase.READY
    verify = next_item(s, "target")
    assert verify.start == 3 and verify.feed == [20, 21, 22, 23] and verify.drafted == 3
    s.on_reply(verified(verify, 1, 30))  # 21 kept, 22 rejected for 30
    assert sequence.generated == [20, 21, 30] and sequence.phase is Phase.DRAFT_NEEDED
    again = next_item(s, "draft")
    # the draft's cache holds prompt + 20, 21, 22: roll back to the common prefix, read the correction
    assert again.start == 5 and again.feed == [30]
    stats = sequence.stats
    assert (stats.drafted, stats.accepted, stats.accepted_lengths, stats.window_sizes) == (3, 1, [1], [3])


def test_a_window_never_outgrows_the_tokens_left():
    s = scheduler(mode="serial", k=5, max_new_tokens=3)
    sequence = s.add(0, PROMPT)
    prefill(s)
    draft = next_item(s, "draft")
    assert draft.count == 1  # 2 tokens left: one drafted, one the target's own
    s.on_reply(drafted(draft, [21]))
    s.on_reply(verified(next_item(s, "target"), 1, 22))
    assert sequence.finish_reason == "length" and len(sequence.generated) == 3


def test_eos_finishes_the_sequence_mid_window():
    s = scheduler(mode="serial", k=3)
    sequence = s.add(0, PROMPT)
    prefill(s)
    s.on_reply(drafted(next_item(s, "draft"), [21, EOS, 23]))
    s.on_reply(verified(next_item(s, "target"), 3, 24))
    assert sequence.generated == [20, 21, EOS] and sequence.finish_reason == "eos"
    assert [next_item(s, "draft"), next_item(s, "target")] == [Release(0), Release(0)]


def test_adaptive_k_grows_after_full_acceptance_and_shrinks_after_a_rejection():
    s = scheduler(mode="serial", k=4, k_policy="adaptive")
    sequence = s.add(0, PROMPT)
    prefill(s)
    assert sequence.k == 4
    s.on_reply(drafted(next_item(s, "draft"), [1, 2, 3, 4]))
    s.on_reply(verified(next_item(s, "target"), 1, 9))
    assert sequence.k == 2  # accepted + 1
    draft = next_item(s, "draft")
    assert draft.count == 2
    s.on_reply(drafted(draft, [1, 2]))
    s.on_reply(verified(next_item(s, "target"), 2, 9))
    assert sequence.k == 3  # one longer, up to --k
    assert sequence.stats.window_sizes == [4, 2]


# --- overlap: drafting ahead --------------------------------------------------------------------------


def overlap_at_first_window(k: int = 2, **decode):
    """Overlap after the prefill and a first drafted window: the target verifies [21, 22]."""
    s = scheduler(mode="overlap", k=k, **decode)
    sequence = s.add(0, PROMPT)
    ahead = next_item(s, "target")  # the prefill
    behind_prefill = next_item(s, "draft")
    assert isinstance(behind_prefill, SpeculateRequest) and behind_prefill.bonus_guesses == 4
    s.on_reply(verified(ahead, 0, 20))
    assert sequence.phase is Phase.AWAITING_AHEAD  # the verification beat its drafting ahead
    s.on_reply(drafted_ahead(behind_prefill, [11, 12, 13, 14], [[1, 2]] * 4))  # none guessed 20: a miss
    assert sequence.phase is Phase.DRAFT_NEEDED and sequence.stats.predraft_misses == 1
    assert s.branch_budget.value == 2  # the drafting ahead outlasted the prefill: two fewer
    draft = next_item(s, "draft")
    assert draft.alternatives == 3  # overlap asks for the runner-ups it bets on
    s.on_reply(drafted(draft, [21, 22][:k]))
    verify = next_item(s, "target")
    assert verify.feed == [20, 21, 22][: k + 1] and sequence.phase is Phase.VERIFYING
    return s, sequence, verify


def test_drafting_ahead_bets_on_the_likeliest_outcomes_of_the_verification_in_flight():
    s, sequence, verify = overlap_at_first_window()
    ahead = next_item(s, "draft")
    assert isinstance(ahead, SpeculateRequest) and ahead.count == 2
    # budget 2: all accepted with the top bonus guess, and rejected at the first drafted token (position 4)
    # corrected to the draft's runner-up there (22 for 21, see `drafted`)
    assert (ahead.forks, ahead.heads, ahead.bonus_guesses) == ([4], [22], 1)
    assert (ahead.start, ahead.feed) == (5, [22])  # the draft's cache holds the rest of the window already
    assert sequence.verification.ahead.request_id == ahead.request_id
    assert next_item(s, "draft") is None  # one round of drafting ahead per verification


def test_a_hit_hands_the_drafted_ahead_window_to_the_target():
    s, sequence, verify = overlap_at_first_window()
    ahead = next_item(s, "draft")
    s.on_reply(drafted_ahead(ahead, [40], [[31, 32], [41, 42]]))  # before the verification: no VerifyNext yet
    s.on_reply(verified(verify, 0, 22))  # 21 rejected for 22: the rejection branch
    assert s.branch_budget.value == 3  # it finished in time: one more
    assert sequence.phase is Phase.READY and sequence.window.tokens == [31, 32]
    stats = sequence.stats
    assert (stats.predraft_hits, stats.alt_hits, stats.speculated_branches) == (1, 1, [4, 2])
    follow = next_item(s, "target")
    assert follow.feed == [22, 31, 32] and follow.start == 4


def test_a_verification_back_before_its_drafting_ahead_waits_for_it():
    s, sequence, verify = overlap_at_first_window()
    ahead = next_item(s, "draft")
    s.on_reply(verified(verify, 2, 40))
    assert sequence.phase is Phase.AWAITING_AHEAD and s.branch_budget.value == 1  # outlasted: two fewer, at least 1
    assert next_item(s, "target") is None and next_item(s, "draft") is None
    s.on_reply(drafted_ahead(ahead, [40], [[31, 32], [41, 42]]))
    assert sequence.phase is Phase.READY and sequence.window.tokens == [41, 42]
    assert sequence.stats.predraft_hits == 1 and sequence.stats.alt_hits == 0  # the bonus guess was right


def test_a_miss_sends_the_draft_back_to_drafting():
    s, sequence, verify = overlap_at_first_window()
    s.on_reply(drafted_ahead(next_item(s, "draft"), [40], [[31, 32], [41, 42]]))
    s.on_reply(verified(verify, 2, 45))  # all accepted, bonus 45: nobody guessed it
    assert sequence.phase is Phase.DRAFT_NEEDED and sequence.stats.predraft_misses == 2
    again = next_item(s, "draft")
    assert (again.start, again.feed) == (6, [45])


def test_windows_drafted_in_time_follow_the_verification_and_the_target_goes_on_by_itself():
    s, sequence, verify = overlap_at_first_window()
    ahead = next_item(s, "draft")
    s.on_reply(drafted_ahead(ahead, [40], [[31, 32], [41, 42]]))
    chained = next_item(s, "target", unanswered=1)
    assert isinstance(chained, VerifyNext) and chained.after == verify.request_id
    assert (chained.accepted, chained.next_tokens, chained.windows) == ([0, 2], [22, 40], [[31, 32], [41, 42]])
    assert next_item(s, "target", unanswered=1) is None  # one VerifyNext per verification
    assert next_item(s, "target", unanswered=2) is None
    s.on_reply(verified(verify, 2, 40))  # all accepted, bonus 40: the second branch
    assert sequence.phase is Phase.VERIFYING and sequence.verification.request_id == chained.request_id
    assert sequence.verification.window.tokens == [41, 42] and sequence.stats.predraft_hits == 1
    assert sequence.target_cache.tokens[-3:] == [40, 41, 42]
    # the chained verification is verified like any other, and may be drafted ahead for itself
    assert isinstance(next_item(s, "draft"), SpeculateRequest)
    s.on_reply(VerifyResult(chained.request_id, 0, 1, 50, 8, 0.001))  # 41 kept: prompt, 20 21 22 40 41 cached
    assert sequence.generated == [20, 21, 22, 40, 41, 50]


def test_a_chained_miss_is_skipped_at_the_target_and_drafted_anew():
    s, sequence, verify = overlap_at_first_window()
    s.on_reply(drafted_ahead(next_item(s, "draft"), [40], [[31, 32], [41, 42]]))
    chained = next_item(s, "target", unanswered=1)
    s.on_reply(verified(verify, 1, 44))  # 21 kept, 22 rejected for 44: no branch
    assert sequence.phase is Phase.DRAFT_NEEDED and sequence.stats.predraft_misses == 2
    assert next_item(s, "target") is None  # nothing to verify until the draft has drafted
    s.on_reply(Skipped(chained.request_id, 0))
    assert sequence.phase is Phase.DRAFT_NEEDED and isinstance(next_item(s, "draft"), DraftRequest)


def test_nothing_is_drafted_ahead_when_the_verification_can_finish_the_sequence():
    s, sequence, verify = overlap_at_first_window(max_new_tokens=4)
    assert next_item(s, "draft") is None  # at most one token after the window: no room for another window


def test_an_outcome_that_ends_the_sequence_is_not_chained():
    s, sequence, verify = overlap_at_first_window()
    s.on_reply(drafted_ahead(next_item(s, "draft"), [EOS], [[31, 32], [41, 42]]))
    chained = next_item(s, "target", unanswered=1)
    assert chained.next_tokens == [22]  # an EOS bonus would finish the sequence: nothing to go on with
    s.on_reply(verified(verify, 2, EOS))
    assert sequence.finish_reason == "eos" and not s.done  # the VerifyNext is still at the target
    s.on_reply(Skipped(chained.request_id, 0))
    assert [next_item(s, "draft"), next_item(s, "target")] == [Release(0), Release(0)] and s.done


def test_distributions_must_come_when_sampling_and_only_then():
    s = scheduler(mode="serial", k=2, sampling=SamplingParams(temperature=0.8))
    s.add(0, PROMPT)
    prefill(s)
    draft = next_item(s, "draft")
    with pytest.raises(RuntimeError, match="expected 2x50"):
        s.on_reply(drafted(draft, [21, 22]))
    s = scheduler(mode="serial", k=2, sampling=SamplingParams(temperature=0.8))
    sequence = s.add(0, PROMPT)
    prefill(s)
    draft = next_item(s, "draft")
    probs = torch.full((2, VOCAB), 1 / VOCAB)
    s.on_reply(DraftResult(draft.request_id, 0, [21, 22], probs, [[], []], 5, 0.001))
    verify = next_item(s, "target")
    assert torch.equal(verify.probs, probs) and sequence.phase is Phase.VERIFYING


def test_a_worker_claiming_positions_it_was_never_sent_stops_the_run():
    s = scheduler(mode="target-only")
    s.add(0, PROMPT)
    request = next_item(s, "target")
    with pytest.raises(RuntimeError, match="target cache of sequence 0 holds 9 positions, expected at most 3"):
        s.on_reply(VerifyResult(request.request_id, 0, 0, 20, 9, 0.001))


# --- finishing ------------------------------------------------------------------------------------------


def test_replies_for_a_finished_sequence_only_settle_the_caches():
    s, sequence, verify = overlap_at_first_window(k=2, max_new_tokens=6)
    ahead = next_item(s, "draft")
    assert ahead.count == 1  # room for one more token's window: 6 - (1 + 2 + 1) - 1
    s.on_reply(verified(verify, 2, EOS))  # finished while its drafting ahead is still at the draft
    assert sequence.phase is Phase.FINISHED and sequence.finish_reason == "eos"
    s.on_reply(drafted_ahead(ahead, [40], [[31], [41]]))
    assert sequence.phase is Phase.FINISHED and sequence.draft_cache.tokens == PROMPT + [20, 21, 22]
    assert [next_item(s, "draft"), next_item(s, "target")] == [Release(0), Release(0)]
    assert s.done


def test_cancel_finishes_every_sequence_and_names_the_slots_to_free():
    s = scheduler(concurrency=1, mode="serial")
    first, second = s.add(0, PROMPT), s.add(1, PROMPT)
    prefill(s)
    assert s.cancel() == [0]  # only the admitted one holds slots
    assert (first.finish_reason, second.finish_reason) == ("cancelled", "cancelled")
    assert first.phase is second.phase is Phase.FINISHED and s.done and not s.waiting


def test_each_sequence_carries_its_own_length_and_sampling_to_the_workers():
    s = scheduler(concurrency=2, mode="target-only", max_new_tokens=10)
    hot = SamplingParams(temperature=0.8, top_k=5, seed=3)
    short = s.add(0, PROMPT, max_new_tokens=2, sampling=hot)
    default = s.add(1, PROMPT)
    assert (short.max_new_tokens, default.max_new_tokens) == (2, 10)
    batch = s.next_request("target")
    assert [item.sampling for item in batch_items(batch)] == [hot, SamplingParams()]
    with pytest.raises(ValueError, match="exists already"):
        s.add(1, PROMPT)
    with pytest.raises(ValueError, match="at least 1"):
        s.add(2, PROMPT, max_new_tokens=0)


def test_cancelling_one_sequence_frees_its_slots_and_leaves_the_others_running():
    s = scheduler(concurrency=1, mode="target-only", max_new_tokens=10)
    running, waiting = s.add(0, PROMPT), s.add(1, PROMPT)
    prefill(s)
    assert s.cancel_sequence(1) and waiting.finish_reason == "cancelled" and not s.waiting
    assert s.control["target"] == []  # a waiting sequence holds no slot
    assert s.cancel_sequence(0) and running.finish_reason == "cancelled"
    assert s.control["target"] == [Release(0)]
    assert not s.cancel_sequence(0)  # finished already
    assert s.next_request("target") == Release(0) and s.done


def test_prune_forgets_finished_sequences_once_nothing_in_flight_refers_to_them():
    s = scheduler(concurrency=2, mode="target-only", max_new_tokens=10)
    s.add(0, PROMPT), s.add(1, PROMPT)
    batch = s.next_request("target")  # both prefills in flight
    s.cancel_sequence(0)
    assert s.prune() == []  # its prefill has not come back
    answers = [verified(request, 0, 20) for request in batch_items(batch)]
    s.on_reply(TargetBatchResult(batch.request_id, [], answers, [], [], rows=2, busy_s=0.001))
    assert [sequence.seq_id for sequence in s.prune()] == [0]
    assert list(s.sequences) == [1]


# --- many sequences: batches, a failed item, the goodput controller ------------------------------------


def test_one_target_batch_carries_every_ready_sequence_and_a_failed_item_fails_its_sequence_alone():
    from workers.protocol.messages import ErrorReply, TargetBatchResult

    s = scheduler(concurrency=3, mode="target-only", max_new_tokens=4)
    sequences = [s.add(i, PROMPT) for i in range(3)]
    batch = s.next_request("target")
    assert [r.seq_id for r in batch.verifies] == [0, 1, 2] and all(r.prompt for r in batch.verifies)
    first, second, third = batch.verifies
    s.on_reply(TargetBatchResult(batch.request_id, [], [verified(first, 0, 20), verified(third, 0, 22)], [],
                                 [ErrorReply(second.request_id, "ValueError: bad", fatal=False)], 9, 0.001))
    assert sequences[1].finish_reason == "error" and sequences[1].error == "ValueError: bad"
    assert [sequences[0].generated, sequences[2].generated] == [[20], [22]]
    assert next_item(s, "target") == Release(1)  # its slot is freed; the others go on, in one batch
    step = s.next_request("target")
    assert [r.seq_id for r in step.verifies] == [0, 2] and [r.feed for r in step.verifies] == [[20], [22]]


def test_a_batch_missing_an_answer_stops_the_run():
    from workers.protocol.messages import TargetBatchResult

    s = scheduler(concurrency=2, mode="target-only")
    s.add(0, PROMPT)
    s.add(1, PROMPT)
    batch = s.next_request("target")
    with pytest.raises(RuntimeError, match="without an answer"):
        s.on_reply(TargetBatchResult(batch.request_id, [], [verified(batch.verifies[0], 0, 20)], [], [], 3, 0.0))


def test_a_long_prompt_is_prefilled_in_aligned_chunks_and_its_last_is_a_verification():
    from workers.protocol.messages import Prefilled

    s = scheduler(mode="target-only", prefill_chunk=4)
    prompt = list(range(1, 11))  # 10 tokens: chunks 0..3, 4..7, then 8..9 with the verdict
    sequence = s.add(0, prompt)
    for start in (0, 4):
        chunk = next_item(s, "target")
        assert (chunk.start, chunk.feed) == (start, prompt[start : start + 4]) and sequence.phase is Phase.PREFILLING
        s.on_reply(Prefilled(chunk.request_id, 0, start + 4))
    last = next_item(s, "target")
    assert isinstance(last, VerifyRequest) and last.prompt and (last.start, last.feed) == (8, prompt[8:])
    s.on_reply(verified(last, 0, 30))
    assert sequence.generated == [30] and sequence.stats.plain_steps == 0  # the prefill is not a plain step
    step = next_item(s, "target")
    assert not step.prompt and step.feed == [30]
    s.on_reply(verified(step, 0, 31))
    assert sequence.stats.plain_steps == 1


def verify_step(s: Scheduler, accepted: int | None = None, next_token: int = 22) -> VerifyRequest:
    """One target step of a single sequence, answered as a batch (the controller plans once per batch);
    `accepted` None: all drafted tokens kept."""
    from workers.protocol.messages import TargetBatchResult

    batch = s.next_request("target")
    (request,) = batch.verifies
    reply = verified(request, request.drafted if accepted is None else accepted, next_token)
    s.on_reply(TargetBatchResult(batch.request_id, [], [reply], [], [], len(request.feed), 0.001))
    return request


def test_the_goodput_policy_stops_drafting_when_the_draft_gets_slow_and_says_so():
    clock, events = Clock(), []
    s = Scheduler(DecodeConfig(mode="serial", k=4, k_policy="goodput", max_new_tokens=100), VOCAB, {EOS}, CONTEXT, 1,
                  clock=clock, on_event=events.append)
    s.controller.explore_every = 0  # no exploring: the plans follow the costs alone
    sequence = s.add(0, PROMPT)
    for rows in range(1, 6):  # a target pass costs 10 ms whatever its rows: verifying is nearly free
        s.observe_pass("target", rows, 1, 0.010)
    s.observe_pass("draft", 1, 1, 0.001)
    verify_step(s, next_token=20)  # the prefill
    for _ in range(6):  # a fast draft, and every drafted token accepted: speculation pays
        clock.now += 0.1
        s.observe_pass("draft", 1, 1, 0.001)
        draft = next_item(s, "draft")
        s.on_reply(drafted(draft, [21] * draft.count))
        verify_step(s)
    assert sequence.k > 0 and not events
    for _ in range(4):  # the draft starves (a busy host): 60 ms a step, six times a whole target pass
        clock.now += 0.1
        s.observe_pass("draft", 1, 1, 0.060)
        if sequence.phase is Phase.DRAFT_NEEDED:
            draft = next_item(s, "draft")
            s.on_reply(drafted(draft, [21] * draft.count))
        verify_step(s)
    assert sequence.k == 0 and sequence.phase is Phase.READY and sequence.window.tokens == []
    assert any(line.startswith("speculation off") for line in events)
    summary = s.controller_summary()
    assert summary["speculation_off_events"] == 1 and summary["zero_k_share"] > 0
    assert sequence.stats.plain_steps > 0
