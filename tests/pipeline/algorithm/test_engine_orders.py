"""The real Scheduler and Engine against an adversary that orders and times every reply (tests/pipeline/adversary.py).

Hypothesis generates the scenarios (mode, k policy, k, concurrency 1-16, greedy or sampled, chunked
prompts, EOS, a full context, requests arriving mid-run, cancels, failed items) and the tape of the
adversary's choices, and shrinks whatever fails. Whatever the order, a run must finish (no stall, no
request sent twice, every slot released once), and every sequence's tokens must be the target's own
(`pipeline.algorithm.reference`), or a prefix of them for one cancelled or failed. The examples Hypothesis found
are replayed as plain tests at the end of this file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.algorithm.engine import Engine
from pipeline.algorithm.reference import reference_decode
from pipeline.algorithm.scheduler import Scheduler
from pipeline.algorithm.sequence import Phase, Sequence
from pipeline.algorithm.speculation import SpeculationPlan
from pipeline.config import K_POLICIES, MODES, DecodeConfig
from pipeline.errors import Stalled
from tests.pipeline.adversary import AdversarialTransport, Choices, DrawnPlans, ManualClock
from workers.model import ModelRunner
from workers.protocol.messages import Release, TargetBatchResult, VerifyResult
from workers.sampling import SamplingParams
from workers.service import WorkerService

VOCAB, CONTEXT, SLOTS = 16, 40, 16
MAX_STEPS = 4000  # engine steps: a run that needs more has stopped making progress
EXAMPLES = int(os.environ.get("SPECPIPE_ORDER_EXAMPLES", "120"))  # more for a deeper search by hand


@dataclass(frozen=True)
class Scenario:
    mode: str
    k_policy: str  # one of K_POLICIES, or "drawn": the adversary plans every k (tests/pipeline/adversary.py)
    k: int
    concurrency: int
    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    sampling: str = "greedy"  # greedy, top-1 (the rejection rule, bound to give the greedy tokens) or sampled
    seed: int = 0
    draft: str = "other"  # "same": the target's own weights (everything accepted); "other": a different model
    prefill_chunk: int = 64
    max_branches: int = 12
    eos: int | None = None
    upfront: int = 1_000  # requests there from the start; the rest arrive one a step, as a server's do
    cancels: bool = False
    item_errors: bool = False

    @property
    def sampling_params(self) -> SamplingParams:
        if self.sampling == "greedy":
            return SamplingParams()
        return SamplingParams(1.0, top_k=1 if self.sampling == "top-1" else 0, seed=self.seed)


@dataclass
class Run:
    sequences: list[Sequence]
    scheduler: Scheduler
    transport: AdversarialTransport
    failed_seqs: set[int] = field(default_factory=set)


def tiny_checkpoint(directory, seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CONTEXT,
                         initializer_range=1.0, eos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("orders")
    target_dir, other_dir = tiny_checkpoint(tmp / "target", 2), tiny_checkpoint(tmp / "other", 1)
    load = lambda directory: ModelRunner.from_checkpoint(directory, n_slots=SLOTS, max_seq_len=CONTEXT)  # noqa: E731
    return {"target": load(target_dir), "same": load(target_dir), "other": load(other_dir)}


_references: dict[tuple, list[int]] = {}


def reference(runners, prompt: tuple[int, ...], max_new_tokens: int, eos: int | None) -> list[int]:
    """The target's own greedy tokens after `prompt`."""
    key = (prompt, max_new_tokens, eos)
    if key not in _references:
        config = DecodeConfig(mode="target-only", max_new_tokens=max_new_tokens)
        eos_ids = frozenset() if eos is None else frozenset({eos})
        _references[key] = reference_decode(runners["target"], None, list(prompt), config, eos_ids, CONTEXT)
    return _references[key]


def run_orders(runners, scenario: Scenario, choices: Choices) -> Run:
    """Decodes the scenario's prompts with the adversary making `choices`; raises what the engine raises."""
    clock = ManualClock()
    services = {"target": WorkerService("target", runners["target"])}
    if scenario.mode != "target-only":
        services["draft"] = WorkerService("draft", runners[scenario.draft])
    transport = AdversarialTransport(services, choices, clock, scenario.item_errors)
    config = DecodeConfig(mode=scenario.mode, k=scenario.k, max_new_tokens=scenario.max_new_tokens,
                          sampling=scenario.sampling_params,
                          k_policy="goodput" if scenario.k_policy == "drawn" else scenario.k_policy,
                          max_branches=scenario.max_branches, max_seqs=SLOTS, prefill_chunk=scenario.prefill_chunk)
    config.validate(CONTEXT)
    eos_ids = set() if scenario.eos is None else {scenario.eos}
    scheduler = Scheduler(config, VOCAB, eos_ids, CONTEXT, scenario.concurrency, clock=clock)
    if scenario.k_policy == "drawn" and scheduler.controller is not None:
        scheduler.controller = DrawnPlans(choices, scenario.k)
    engine = Engine(scheduler, transport, clock=clock)
    arrivals = list(enumerate(scenario.prompts))
    sequences = [scheduler.add(seq_id, list(prompt)) for seq_id, prompt in arrivals[: max(1, scenario.upfront)]]
    arrivals = arrivals[len(sequences):]
    try:
        for _ in range(MAX_STEPS):
            if arrivals and (engine.idle or choices.pick("a request arrives now", 2) == 0):
                seq_id, prompt = arrivals.pop(0)
                sequences.append(scheduler.add(seq_id, list(prompt)))
            if scenario.cancels:
                chosen = choices.pick("a client goes away", 4 * len(sequences) + 1) - 1
                if 0 <= chosen < len(sequences):
                    scheduler.cancel_sequence(sequences[chosen].seq_id)
            if engine.idle:  # as a server's engine thread: step only with something to do
                if not arrivals:
                    break
                continue
            engine.step()
        else:
            raise AssertionError(f"no end after {MAX_STEPS} engine steps")
    finally:
        for service in services.values():  # whatever happened, the next example starts with free runners
            service.reset()
    return Run(sequences, scheduler, transport, {transport.item_owners[r] for r in transport.failed_items})


def check(runners, scenario: Scenario, run: Run) -> None:
    """What every run must show, whatever the order of its replies."""
    admitted = sorted(run.scheduler.sequences)
    for role, released in run.transport.released.items():  # each admitted sequence's slots freed, once
        assert sorted(released) == admitted, f"{role} releases {sorted(released)} for admitted {admitted}"
    for runner in runners.values():
        assert runner.free_slot_count == SLOTS
    exact = scenario.sampling != "sampled"
    for sequence in run.sequences:
        assert sequence.phase is Phase.FINISHED
        generated = sequence.generated
        assert len(generated) <= scenario.max_new_tokens and len(sequence.tokens) <= CONTEXT
        if sequence.finish_reason == "error":
            assert sequence.seq_id in run.failed_seqs, f"sequence {sequence.seq_id} failed: {sequence.error}"
        elif sequence.finish_reason == "length":
            assert len(generated) == scenario.max_new_tokens or len(sequence.tokens) == CONTEXT
        elif sequence.finish_reason == "eos":
            assert generated[-1] == scenario.eos and scenario.eos not in generated[:-1]
        else:
            assert sequence.finish_reason == "cancelled" and scenario.cancels
        if exact:
            expected = reference(runners, tuple(sequence.prompt), scenario.max_new_tokens, scenario.eos)
            if sequence.finish_reason in ("length", "eos"):
                assert generated == expected, f"sequence {sequence.seq_id}"
            else:
                assert generated == expected[: len(generated)], f"sequence {sequence.seq_id}"


# --- the property ---------------------------------------------------------------------------------------

tokens = st.integers(0, VOCAB - 1)


@st.composite
def scenarios(draw) -> Scenario:
    mode = draw(st.sampled_from(MODES))
    count = draw(st.integers(1, 16))
    prompts = draw(st.lists(st.lists(tokens, min_size=1, max_size=10).map(tuple), min_size=count, max_size=count))
    if draw(st.booleans()):  # one prompt that leaves room for a few tokens only
        prompts[0] = tuple((list(prompts[0]) * CONTEXT)[: CONTEXT - draw(st.integers(2, 5))])
    return Scenario(
        mode=mode,
        k_policy=draw(st.sampled_from([*K_POLICIES, "drawn"])),
        k=draw(st.integers(1, 5)),
        concurrency=draw(st.one_of(st.just(1), st.integers(1, 16))),
        prompts=tuple(prompts),
        max_new_tokens=draw(st.integers(1, 12)),
        sampling=draw(st.sampled_from(["greedy", "top-1", "sampled"])),
        seed=draw(st.integers(0, 3)),
        draft=draw(st.sampled_from(["other", "same"])),
        prefill_chunk=draw(st.sampled_from([64, 0, 2, 3])),
        max_branches=draw(st.integers(1, 12)),
        eos=draw(st.sampled_from([None, None, 3, 7])),
        upfront=draw(st.integers(1, count)),
        cancels=draw(st.booleans()),
        item_errors=draw(st.booleans()),
    )


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(), data=st.data())
def test_every_order_of_replies_finishes_with_the_targets_tokens(runners, scenario, data):
    choices = Choices(draw=lambda what, count: data.draw(st.integers(0, count - 1), label=what))
    try:
        run = run_orders(runners, scenario, choices)
    finally:
        note(f"to replay: run_orders(runners, {scenario!r}, Choices({choices.tape}))")
    check(runners, scenario, run)


# --- found by hand and by Hypothesis, replayed as plain tests ----------------------------------------------


class Recording:
    """A transport that only records what is sent (no reply ever comes)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def submit(self, role: str, message: object) -> None:
        self.sent.append((role, message))

    def wait(self, timeout_s: float, busy: frozenset[str] = frozenset()) -> list[tuple[str, object]]:
        return []


def serial_sequence_awaiting_its_draft(clock: ManualClock, k_policy: str = "fixed") -> Scheduler:
    """A scheduler whose one sequence has its first token and waits for the draft's window."""
    scheduler = Scheduler(DecodeConfig(mode="serial", k=3, max_new_tokens=8, k_policy=k_policy), VOCAB, set(),
                          CONTEXT, clock=clock)
    scheduler.add(0, [1, 2, 3])
    batch = scheduler.next_request("target")
    (prompt,) = batch.verifies
    scheduler.on_reply(TargetBatchResult(batch.request_id, [], [VerifyResult(prompt.request_id, 0, 0, 5, 3, 0.0)],
                                         [], [], 3, 0.0))
    assert scheduler.sequences[0].phase is Phase.DRAFT_NEEDED
    return scheduler


class NothingPays:
    """A goodput controller that finds drafting no longer pays for anyone."""

    def plan(self, seq_ids, branches=1, prompt_rows=0):
        return SpeculationPlan({seq_id: 0 for seq_id in seq_ids}, None, None, "goodput")

    def forget(self, seq_id):
        pass


def test_a_sequence_whose_k_falls_to_0_while_it_waits_for_the_draft_goes_to_the_target():
    # The goodput controller replans every running sequence's k at each target reply, so one waiting for the
    # draft (busy drafting for others) can be left with k = 0. It was left "draft needed"; the draft's turn
    # made it a plain step after the target's turn had passed, and with nothing else in flight: the stall.
    clock = ManualClock()
    scheduler = serial_sequence_awaiting_its_draft(clock, "goodput")
    scheduler.controller = NothingPays()
    scheduler._replan()  # what every target reply does first
    assert scheduler.sequences[0].phase is Phase.READY
    transport = Recording()
    Engine(scheduler, transport, clock=clock).step()
    ((role, step),) = transport.sent
    assert role == "target" and step.verifies[0].drafted == 0 and step.verifies[0].feed == [5]


def test_work_the_drafts_turn_leaves_for_the_target_is_sent_before_calling_it_a_stall():
    clock = ManualClock()
    scheduler = serial_sequence_awaiting_its_draft(clock)
    scheduler.sequences[0].k = 0  # however it happened: only the draft's turn finds it has nothing to draft
    transport = Recording()
    Engine(scheduler, transport, clock=clock).step()
    ((role, step),) = transport.sent
    assert role == "target" and step.verifies[0].drafted == 0


def test_a_stall_names_the_stuck_sequences_and_a_server_fails_only_them(monkeypatch):
    clock = ManualClock()
    scheduler = Scheduler(DecodeConfig(mode="serial", k=3, max_new_tokens=8, k_policy="fixed"), VOCAB, set(), CONTEXT, clock=clock)
    scheduler.add(0, [1, 2, 3])
    engine = Engine(scheduler, Recording(), clock=clock)
    monkeypatch.setattr(scheduler, "next_request", lambda role, unanswered=0: None)  # a scheduler with a bug
    scheduler._admit()
    with pytest.raises(Stalled) as stalled:
        engine.step()
    assert stalled.value.seq_ids == [0]
    assert "sequence 0: ready, k 3, 0/8 tokens, window of 0" in str(stalled.value)
    heard: list[str] = []
    engine = Engine(scheduler, Recording(), clock=clock, on_stall=heard.append)
    engine.step()  # the server's way: the stuck sequence fails, the engine goes on
    (report,) = heard
    assert "sequence 0: ready" in report
    assert scheduler.sequences[0].finish_reason == "error" and "stalled" in scheduler.sequences[0].error
    assert scheduler.control["target"] == [Release(0)]  # its slot is freed next


# Orders Hypothesis found (the scenario and the adversary's recorded choices), each a bug it fixed.
FOUND = {
    # One sequence, overlap: the verification comes back a miss ("draft needed"), the VerifyNext queued behind
    # it comes back skipped, and the replan at that reply sets k to 0. The draft's turn made the sequence a plain
    # step after the target's turn: nothing was sent, nothing awaited, "coordinator stalled".
    "stall when k falls to 0 between a miss and its skipped VerifyNext": (
        Scenario(mode="overlap", k_policy="drawn", k=1, concurrency=1, prompts=((10,),), max_new_tokens=4,
                 max_branches=1),
        [2, 1, 1, 1, 0, 2, 3, 0, 0, 1, 1, 0, 0, 3, 2, 1, 1, 3, 2, 3]),
    # The same with a second request whose client leaves while it waits.
    "stall after a cancel": (
        Scenario(mode="overlap", k_policy="drawn", k=1, concurrency=1, prompts=((13,), (10,)), max_new_tokens=4,
                 max_branches=1, cancels=True),
        [1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1]),
    # A sequence ends (here its verification fails) while the VerifyNext behind its verification is at the
    # target, which goes on with it: its reply reports a cache longer than the coordinator's mirror, and the
    # mirror's check raised for a sequence that no longer mattered, ending the whole run.
    "a late VerifyNext reply for a sequence that ended": (
        Scenario(mode="overlap", k_policy="drawn", k=1, concurrency=1, prompts=((0,),) * 11, max_new_tokens=9,
                 draft="same", max_branches=1, upfront=9, cancels=True, item_errors=True),
        [0] * 116 + [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]),
}


@pytest.mark.parametrize("found", FOUND)
def test_orders_found_by_hypothesis(runners, found):
    scenario, tape = FOUND[found]
    check(runners, scenario, run_orders(runners, scenario, Choices(tape)))
