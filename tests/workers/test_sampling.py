"""Speculative sampling emits tokens distributed exactly as the target's own sampling."""

import functools
import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import workers.target_core
from pipeline.algorithm.generation import ModelLimits, generate
from pipeline.config import DecodeConfig
from pipeline.runtime.in_process import LocalTransport
from workers.model import ModelRunner
from workers.sampling import (
    SamplingParams,
    greedy_accept,
    keyed_accept,
    keyed_pick,
    probabilities,
    rejection_accept,
    sample,
)

CHI2_CRITICAL = {5: 20.52}  # chi-square quantile at p = 0.001


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def broken_accept(target_probs, drafted, draft_probs, generator):
    """The classic bug: on rejection resample from p instead of from normalise(max(0, p - q))."""
    for i, token in enumerate(drafted):
        if torch.rand(1, generator=generator).item() * draft_probs[i, token] > target_probs[i, token]:
            return i, sample(target_probs[i], generator)
    return len(drafted), sample(target_probs[len(drafted)], generator)


P = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04], [0.05, 0.05, 0.10, 0.20, 0.30, 0.30]])
Q = torch.tensor([[0.10, 0.10, 0.20, 0.20, 0.20, 0.20], [0.30, 0.30, 0.20, 0.10, 0.05, 0.05]])


def emitted_first_tokens(rule, n=10_000) -> torch.Tensor:  # a broken rule scores ~1000 here, the bar is 20.5
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    target_probs = torch.cat([P, P[:1]])  # position 2 (the bonus) is never the first token
    for _ in range(n):
        drafted = [sample(Q[0], generator), sample(Q[1], generator)]
        accepted, next_token = rule(target_probs, drafted, Q, generator)
        counts[drafted[0] if accepted > 0 else next_token] += 1
    return counts


def test_rejection_rule_reproduces_the_target_distribution():
    assert chi_square(emitted_first_tokens(rejection_accept), P[0]) < CHI2_CRITICAL[5]


def test_the_test_catches_a_broken_rule():
    assert chi_square(emitted_first_tokens(broken_accept), P[0]) > CHI2_CRITICAL[5]


def test_the_position_keyed_race_draws_from_the_distribution_and_is_the_same_each_time():
    positions = list(range(40_000))
    picks = keyed_pick(P[:1].expand(len(positions), 6), seed=5, positions=positions)
    assert chi_square(torch.bincount(torch.tensor(picks), minlength=6).float(), P[0]) < CHI2_CRITICAL[5]
    assert keyed_pick(P[:1], seed=5, positions=[17]) == [picks[17]]  # a function of (seed, position) alone
    assert keyed_pick(P[:1].expand(50, 6), seed=6, positions=positions[:50]) != picks[:50]


def test_position_keyed_verification_emits_the_targets_own_picks_whatever_was_drafted():
    target_probs = torch.cat([P, P[:1]])
    own = keyed_pick(target_probs, seed=9, positions=[30, 31, 32])
    for drafted in ([own[0], own[1]], [own[0], (own[1] + 1) % 6], [(own[0] + 1) % 6, own[1]]):
        accepted, next_token = keyed_accept(target_probs, drafted, seed=9, first_position=30)
        assert (drafted[:accepted] + [next_token]) == own[: accepted + 1]


def test_greedy_accept():
    logits = torch.tensor([[0.0, 5, 1], [9, 0, 0], [0, 0, 3]])
    assert greedy_accept(logits, [1, 0]) == (2, 2)
    assert greedy_accept(logits, [1, 2]) == (1, 0)
    assert greedy_accept(logits, [2, 0]) == (0, 1)
    assert greedy_accept(logits[:1], []) == (0, 1)


def test_top_k_and_top_p_filter_before_sampling():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(probabilities(logits, SamplingParams(1.0, top_k=2)), torch.tensor([[0.625, 0.375, 0, 0]]))
    kept = probabilities(logits, SamplingParams(1.0, top_p=0.7))  # 0.5 + 0.3 reaches 0.7
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0, 0]]))
    low = probabilities(logits, SamplingParams(0.5))
    assert low[0, 0] > 0.5 and torch.allclose(low.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("params, message", [
    (SamplingParams(-1.0), "--temperature must be >= 0"), (SamplingParams(1e-9), "--temperature must be 0"),
    (SamplingParams(float("nan")), "finite"), (SamplingParams(float("inf")), "finite"),
    (SamplingParams(1.0, top_p=float("nan")), "finite"), (SamplingParams(1.0, top_p=0), "--top-p"),
    (SamplingParams(1.0, top_p=1.5), "--top-p"), (SamplingParams(1.0, top_k=-1), "--top-k"),
    (SamplingParams(1.0, seed=-1), "--seed"), (SamplingParams(1.0, seed=2**63), "--seed"),
])
def test_bad_sampling_settings(params, message):
    with pytest.raises(ValueError, match=message):
        params.validate()


def test_top_k_is_held_to_the_vocabulary_where_it_is_known():
    SamplingParams(1.0, top_k=4096).validate()  # the coordinator's check: no vocabulary yet
    SamplingParams(1.0, top_k=4096).validate(vocab_size=4096)
    with pytest.raises(ValueError, match="at most the vocabulary's 4096"):
        SamplingParams(1.0, top_k=4097).validate(vocab_size=4096)


# --- end to end: two tiny random models on an 8-token vocabulary, through the scheduler -----------


BATCH = 4  # sequences decoded at once in the batched runs
RUNS = 3000  # generations per chi-square test: test_pipeline_with_a_broken_rule_fails shows this many catch a bug
VARIANT_RUNS = 1500  # for the variants of the serial and overlap checks (batched, position-keyed, drafted ahead)


def tiny_runner(tmp_path, name, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64, initializer_range=1.0, eos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(tmp_path / name)
    return ModelRunner.from_checkpoint(tmp_path / name, n_slots=BATCH)


PROMPT = [3, 1, 4]


def window_token_counts(draft, target, mode, runs=RUNS, concurrency=1, reproducible=False):
    """Counts of (2nd, 3rd) generated token: the 1st comes from the prefill, these two from a k=2 window.
    With `concurrency` > 1 that many sequences of the prompt are decoded at once, every window of them
    verified in one target pass (each sequence draws from its own seeded stream)."""
    counts = torch.zeros(64)
    limits = ModelLimits(8, frozenset(), 64)
    for seed in range(runs // concurrency):
        config = DecodeConfig(mode=mode, k=2, max_new_tokens=4, k_policy="fixed", sampling=SamplingParams(1.0, seed=seed, reproducible=reproducible))
        sequences, engine = generate(LocalTransport(draft, target, through_wire=False), [PROMPT] * concurrency,
                                     config, limits, concurrency)
        if concurrency > 1:  # the windows really shared target passes
            assert max(t.sequences for t in engine.trips if t.role == "target" and t.kind == "verify") > 1
        for sequence in sequences:
            assert sequence.stats.window_sizes[0] == 2
            _, second, third, _ = sequence.generated
            counts[second * 8 + third] += 1
    return counts


def exact_window_token_probs(target):
    """p(2nd, 3rd) under the target alone, the 1st token summed out."""
    def next_probs(tokens):
        target.truncate(0, 0)
        return torch.softmax(target.forward(tokens, 0)[-1], -1)

    joint = torch.zeros(64)
    first = next_probs(PROMPT)
    for a in range(8):
        second = next_probs(PROMPT + [a])
        for b in range(8):
            joint[b * 8 :  b * 8 + 8] += first[a] * second[b] * next_probs(PROMPT + [a, b])
    return joint


def pooled_chi_square(counts, probs, runs):
    """Chi-square after pooling cells expected fewer than 5 times into one; returns (statistic, dof)."""
    small = probs * runs < 5
    counts = torch.cat([counts[~small], counts[small].sum().view(1)])
    probs = torch.cat([probs[~small], probs[small].sum().view(1)])
    return chi_square(counts, probs), int((~small).sum())


def chi2_critical(dof):
    # Wilson-Hilferty approximation of the chi-square quantile at p = 0.001 (z = 3.09)
    return dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    return tiny_runner(tmp, "draft", 1), tiny_runner(tmp, "target", 2)


@pytest.mark.parametrize("mode", ["serial", "overlap"])
def test_pipeline_sampling_matches_the_target(tiny_pair, mode):
    draft, target = tiny_pair
    statistic, dof = pooled_chi_square(window_token_counts(draft, target, mode), exact_window_token_probs(target), RUNS)
    assert statistic < chi2_critical(dof)


def test_position_keyed_pipeline_sampling_matches_the_target(tiny_pair):
    draft, target = tiny_pair
    counts = window_token_counts(draft, target, "overlap", runs=VARIANT_RUNS, reproducible=True)
    statistic, dof = pooled_chi_square(counts, exact_window_token_probs(target), VARIANT_RUNS)
    assert statistic < chi2_critical(dof)


@pytest.mark.parametrize("mode", ["serial", "overlap"])
def test_batched_sampling_matches_the_target(tiny_pair, mode):
    draft, target = tiny_pair
    counts = window_token_counts(draft, target, mode, runs=VARIANT_RUNS, concurrency=BATCH)
    statistic, dof = pooled_chi_square(counts, exact_window_token_probs(target), VARIANT_RUNS)
    assert statistic < chi2_critical(dof)


def second_window_counts(draft, target, temperature, runs):
    """Counts of (4th, 5th) generated token in overlap k=2: they come from the second window, which is
    pre-drafted during the first verification for its likeliest outcomes, rejections included."""
    counts, from_rejections = torch.zeros(64), 0
    limits = ModelLimits(8, frozenset(), 64)
    for seed in range(runs):
        config = DecodeConfig(mode="overlap", k=2, max_new_tokens=8, k_policy="fixed", sampling=SamplingParams(temperature, seed=seed))
        # drafting ahead finishes while the target verifies: the target goes on by itself (VerifyNext)
        transport = LocalTransport(draft, target, through_wire=False, draft_first=True, one_at_a_time=True)
        (sequence,), _ = generate(transport, [PROMPT], config, limits)
        fourth, fifth = sequence.generated[3:5]
        counts[fourth * 8 + fifth] += 1
        from_rejections += sequence.stats.alt_hits
    return counts, from_rejections


def exact_second_window_probs(target, temperature):
    """p(4th, 5th) under the target alone at `temperature`, the first three tokens summed out."""
    @functools.cache
    def next_probs_of(tokens: tuple[int, ...]):
        target.truncate(0, 0)
        return torch.softmax(target.forward(list(tokens), 0)[-1] / temperature, -1)

    def next_probs(tokens):
        return next_probs_of(tuple(tokens))

    exact = torch.zeros(64)
    for prefix in itertools.product(range(8), repeat=3):
        weight, context = 1.0, list(PROMPT)
        for token in prefix:
            weight *= float(next_probs(context)[token])
            context.append(token)
        fourth = next_probs(context)
        for a in range(8):
            exact[a * 8 : a * 8 + 8] += weight * fourth[a] * next_probs(context + [a])
    return exact


def test_windows_drafted_ahead_for_a_rejection_keep_the_target_distribution(tiny_pair):
    draft, target = tiny_pair
    runs = VARIANT_RUNS
    counts, from_rejections = second_window_counts(draft, target, 2.0, runs)  # flatter than the models' own
    assert from_rejections > runs / 10  # windows drafted for a rejected token were really used
    statistic, dof = pooled_chi_square(counts, exact_second_window_probs(target, 2.0), runs)
    assert statistic < chi2_critical(dof)


def test_pipeline_with_a_broken_rule_fails(tiny_pair, monkeypatch):
    draft, target = tiny_pair
    monkeypatch.setattr(workers.target_core, "rejection_accept", broken_accept)
    statistic, dof = pooled_chi_square(window_token_counts(draft, target, "serial"), exact_window_token_probs(target), RUNS)
    assert statistic > chi2_critical(dof)
