"""Bench at several concurrencies, on hand-made rounds: aggregate rates from round walls, per-request
latencies, speedups against target-only at the same concurrency, the identity check, the outputs."""

import json

import pytest
import torch

from pipeline.bench.config import BenchConfig
from pipeline.bench.figures import combined_speculation, figures, percentile
from pipeline.bench.ours import our_contenders
from pipeline.bench.peers import HfRunner, left_padded, up_to_eos
from pipeline.bench.records import Generation, Round
from pipeline.bench.report import as_json, describe, table_rows, text_table, write_json, write_report
from pipeline.bench.run import HF_PEERS, llama_cpp_contenders, rounds_of, runs_at, summarize
from pipeline.runtime.critical_path import TargetTimeSplit


def sequence(tokens: list[int], ttft: float, gap: float, **stats) -> Generation:
    times = [ttft + gap * i for i in range(len(tokens))]
    return Generation(list(tokens), times[-1], times, **stats)


def round_of(generations: list[Generation], wall: float, prompts: list[int], **engine) -> Round:
    return Round(generations, wall, prompts, **engine)


def test_rates_are_the_rounds_tokens_over_the_rounds_walls_and_latencies_are_per_request():
    # concurrency 4, 6 prompts: a round of 4 and a last round of 2; every sequence makes 5 tokens
    first = [sequence(range(5), 0.1 * (i + 1), 0.02, drafted=6, verifications=2, plain_steps=1) for i in range(4)]
    last = [sequence(range(5), 0.05, 0.01 * (i + 1), drafted=3, verifications=1, plain_steps=2) for i in range(2)]
    split = TargetTimeSplit(1.0, 0.6, 0.1, 0.1, 0.1, 0.05, 0.05)
    rounds = [round_of(first, 1.0, [0, 1, 2, 3], busy_s={"target": 0.7}, ipc_s={"target": 0.1}, coordinator_s=0.05,
                       target_split=split),
              round_of(last, 0.5, [4, 5], busy_s={"target": 0.3}, ipc_s={"target": 0.05}, coordinator_s=0.02)]
    result = figures("overlap k=3", "overlap", 3, "specpipe", rounds, [], concurrency=4)
    assert (result.concurrency, result.rounds, result.sequences, result.tokens) == (4, 2, 6, 30)
    assert result.wall_s == pytest.approx(1.5)  # the rounds' walls, not the sequences' (which add up to more)
    assert result.tokens_per_s == pytest.approx(30 / 1.5)
    assert result.decode_tokens_per_s == pytest.approx(24 / ((1.0 - 0.1) + (0.5 - 0.05)))
    ttfts = [0.1, 0.2, 0.3, 0.4, 0.05, 0.05]
    assert result.ttft_s == pytest.approx(sum(ttfts) / 6)
    assert result.ttft_ms == pytest.approx({f"p{q}": percentile(ttfts, q) * 1e3 for q in (50, 90, 99)})
    gaps = [0.02] * 16 + [0.01] * 4 + [0.02] * 4
    assert result.itl_ms == pytest.approx({f"p{q}": percentile(gaps, q) * 1e3 for q in (50, 90, 99)})
    # drafted tokens per target step per sequence: 4*6 + 2*3 drafted over 4*(2+1) + 2*(1+2) steps
    assert result.mean_drafted_length == pytest.approx(30 / 18)
    # the engine's figures are the rounds', once each, not once per sequence
    assert result.time_split_s["target"] == pytest.approx({"busy": 1.0, "ipc": 0.15, "idle": 0.35})
    assert result.time_split_s["coordinator"]["busy"] == pytest.approx(0.07)
    assert result.target_wall_shares["compute"] == pytest.approx(0.6)


def test_controller_summaries_add_counts_and_weigh_means():
    rounds = [Round([], 1.0, speculation={"plans": 10, "mean_k": 2.0, "zero_k_share": 0.0, "speculation_off_events": 1,
                                          "speculation_off_s": 0.25, "predicted_speedup": 1.5, "reasons": {"a": 2}}),
              Round([], 3.0, speculation={"plans": 30, "mean_k": 1.0, "zero_k_share": 0.5, "speculation_off_events": 2,
                                          "speculation_off_s": 0.5, "predicted_speedup": 1.1,
                                          "reasons": {"a": 1, "b": 4}}),
              Round([], 2.0)]  # a round without a summary
    combined = combined_speculation(rounds)
    assert combined["plans"] == 40 and combined["speculation_off_events"] == 3
    assert combined["speculation_off_s"] == pytest.approx(0.75)
    assert combined["mean_k"] == pytest.approx((10 * 2.0 + 30 * 1.0) / 40)
    assert combined["zero_k_share"] == pytest.approx(30 * 0.5 / 40)
    assert combined["predicted_speedup"] == pytest.approx((1.0 * 1.5 + 3.0 * 1.1) / 4.0)  # by the rounds' walls
    assert combined["reasons"] == {"a": 3, "b": 4}
    assert combined_speculation([Round([], 1.0)]) == {}


def test_prompts_run_in_rounds_of_the_concurrency_and_hf_assisted_and_llama_cpp_only_alone():
    assert rounds_of(6, 4) == [[0, 1, 2, 3], [4, 5]]
    assert rounds_of(3, 1) == [[0], [1], [2]]
    assert rounds_of(2, 16) == [[0, 1]]
    hf_target, hf_assisted = HF_PEERS
    assert runs_at(hf_target, 4) and runs_at(hf_assisted, 1) and not runs_at(hf_assisted, 4)
    llama_target, llama_spec, llama_spec_p_min = llama_cpp_contenders((3,))
    assert (llama_target.system, llama_spec.system, llama_spec.k) == ("llama.cpp", "llama.cpp", 3)
    assert llama_spec.name == "llama.cpp spec k=3" and not llama_spec.ours
    assert llama_spec_p_min.name == "llama.cpp spec k=3 p-min=0.75" and llama_spec_p_min.draft_p_min == 0.75
    assert runs_at(llama_target, 1) and not runs_at(llama_target, 4) and not runs_at(llama_spec, 2)
    assert not runs_at(llama_spec_p_min, 4)


def test_the_goodput_controller_is_a_contender_of_its_own():
    contenders = our_contenders((2, 5))
    assert [c.name for c in contenders] == ["target-only", "serial k=2", "overlap k=2", "serial k=5", "overlap k=5",
                                            "overlap goodput k<=5"]
    goodput = contenders[-1]
    assert (goodput.mode, goodput.k, goodput.k_policy) == ("overlap", 5, "goodput")
    assert {c.k_policy for c in contenders[:-1]} == {"fixed"}


def test_concurrency_is_validated():
    BenchConfig(concurrency=(1, 4, 16)).validate()
    assert BenchConfig(concurrency=(16, 1, 4, 4)).concurrencies == [1, 4, 16]
    for bad in ((0,), (1, -2), ()):
        with pytest.raises(ValueError, match="--concurrency"):
            BenchConfig(concurrency=bad).validate()


# --- a whole (hand-made) run: summarize, the table, JSON and report -------------------------------

PROMPTS = 4
REFERENCE = {i: [10 + i, 20 + i, 30 + i] for i in range(PROMPTS)}


def made(indices: list[int], rate: float, wall: float, tokens=REFERENCE, **stats) -> Round:
    """A round that made `tokens` for its prompts, 3 tokens each at `rate` seconds apart."""
    return Round([sequence(tokens[i], 0.01, rate, **stats) for i in indices], wall, indices)


@pytest.fixture
def result():
    config = BenchConfig(k=(2,), concurrency=(1, 2), max_new_tokens=3)
    contenders = our_contenders((2,)) + list(HF_PEERS) + llama_cpp_contenders((2,))
    wrong = {**REFERENCE, 3: [10, 20, 99]}
    controller = {"plans": 8, "mean_k": 1.5, "zero_k_share": 0.25, "speculation_off_events": 2,
                  "speculation_off_s": 0.3, "predicted_speedup": 1.25, "reasons": {"acceptance low": 2}}
    runs = {
        ("target-only", 1): [made([i], 0.01, 0.1) for i in range(PROMPTS)],  # 12 tokens in 0.4 s: 30 tok/s
        ("serial k=2", 1): [made([i], 0.01, 0.08) for i in range(PROMPTS)],
        ("overlap k=2", 1): [made([i], 0.01, 0.05) for i in range(PROMPTS)],
        ("overlap goodput k<=2", 1): [made([i], 0.01, 0.05) for i in range(PROMPTS)],
        ("hf target-only", 1): [made([i], 0.01, 0.2) for i in range(PROMPTS)],
        ("hf assisted", 1): [made([i], 0.01, 0.2) for i in range(PROMPTS)],
        ("llama.cpp target-only", 1): [made([i], 0.01, 0.08) for i in range(PROMPTS)],  # 12 tokens in 0.32 s
        ("llama.cpp spec k=2", 1): [made([i], 0.01, 0.16, drafted=4, accepted=1) for i in range(PROMPTS)],
        ("target-only", 2): [made([0, 1], 0.01, 0.12), made([2, 3], 0.01, 0.12)],  # 12 tokens in 0.24 s: 50 tok/s
        ("serial k=2", 2): [made([0, 1], 0.01, 0.12), made([2, 3], 0.01, 0.12, wrong)],
        ("overlap k=2", 2): [made([0, 1], 0.01, 0.1), made([2, 3], 0.01, 0.1)],
        ("overlap goodput k<=2", 2): [Round(made([0, 1], 0.01, 0.08).generations, 0.08, [0, 1], speculation=controller),
                                      Round(made([2, 3], 0.01, 0.08).generations, 0.08, [2, 3], speculation=controller)],
        ("hf target-only", 2): [made([0, 1], 0.01, 0.3), made([2, 3], 0.01, 0.3, wrong)],
    }
    return summarize(config, contenders, runs, {}, "specpipe bench --concurrency 1,2")


def test_speedups_are_against_target_only_at_the_same_concurrency(result):
    by = {(f.name, f.concurrency): f for f in result.configs}
    assert by["target-only", 1].tokens_per_s == pytest.approx(12 / 0.4)
    assert by["target-only", 2].tokens_per_s == pytest.approx(12 / 0.24)
    assert by["overlap k=2", 2].speedup_vs_target_only == pytest.approx(0.24 / 0.2)
    assert by["overlap k=2", 1].speedup_vs_target_only == pytest.approx(0.4 / 0.2)
    assert by["overlap k=2", 2].speedup_vs_hf_target_only == pytest.approx(0.6 / 0.2)
    assert ("hf assisted", 2) not in by and ("llama.cpp target-only", 2) not in by  # one at a time only
    assert by["overlap k=2", 1].speedup_vs_llama_cpp_target_only == pytest.approx(0.32 / 0.2)
    assert by["target-only", 2].speedup_vs_llama_cpp_target_only is None  # no llama.cpp at concurrency 2
    spec = by["llama.cpp spec k=2", 1]
    assert spec.system == "llama.cpp" and spec.acceptance_rate == pytest.approx(0.25)  # 4 of 16 drafted accepted
    assert spec.speedup_vs_llama_cpp_target_only == pytest.approx(0.32 / 0.64)
    assert spec.mean_acceptance_length is None and spec.predicted_speedup is None  # the server does not say
    # at concurrency 2 the prediction is the controller's, where there is one
    goodput = by["overlap goodput k<=2", 2]
    assert goodput.predicted_speedup == pytest.approx(1.25) and goodput.k_policy == "goodput"
    assert goodput.measured_over_predicted == pytest.approx(goodput.speedup_vs_target_only / 1.25)
    assert goodput.speculation["speculation_off_events"] == 4 and goodput.speculation["mean_k"] == pytest.approx(1.5)
    assert by["overlap k=2", 2].predicted_speedup is None
    # by concurrency, then configuration; no name holds the concurrency
    assert [(f.concurrency, f.name) for f in result.configs][:6] == [
        (1, "target-only"), (1, "serial k=2"), (1, "overlap k=2"), (1, "overlap goodput k<=2"), (1, "hf target-only"),
        (1, "hf assisted")]
    assert [(f.concurrency, f.name) for f in result.configs][6:9] == [
        (1, "llama.cpp target-only"), (1, "llama.cpp spec k=2"), (2, "target-only")]
    assert not any("conc" in f.name or "c=" in f.name for f in result.configs)


def test_identity_is_against_target_only_at_concurrency_1_for_every_concurrency(result):
    assert result.identical_greedy_outputs is False
    assert result.differing == [{"config": "serial k=2", "concurrency": 2, "prompts": [3]}]
    assert result.peers_identical == {"hf target-only": "4/4", "hf assisted": "4/4", "llama.cpp target-only": "4/4",
                                      "llama.cpp spec k=2": "4/4", "hf target-only at concurrency 2": "3/4"}
    lines = describe(result)
    assert "greedy outputs token-identical across all specpipe configurations: NO" in "\n".join(lines)
    assert any(line.startswith("serial k=2 at concurrency 2 differed") and "prompt(s) 3" in line for line in lines)
    assert any("hf assisted runs at concurrency 1 only" in line for line in lines)
    assert any(line.startswith("llama.cpp: ") and "draft max K" in line for line in lines)
    assert any(line.startswith("concurrency 2: best overlap goodput k<=2") for line in lines)
    assert ("overlap goodput k<=2 at concurrency 2: the controller switched speculation off 4 times (0.6 s): "
            "drafting did not pay") in lines


def test_json_configs_carry_their_concurrency(result, tmp_path):
    write_json(result, tmp_path / "bench.json")
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written == json.loads(json.dumps(as_json(result)))
    assert [(c["name"], c["concurrency"]) for c in written["configs"]][-5:] == [
        ("target-only", 2), ("serial k=2", 2), ("overlap k=2", 2), ("overlap goodput k<=2", 2), ("hf target-only", 2)]
    assert written["settings"]["concurrency"] == [1, 2]
    config = written["configs"][-2]
    assert config["ttft_ms"].keys() == {"p50", "p90", "p99"} and config["speculation"]["plans"] == 16
    assert config["k_policy"] == "goodput"


def test_table_and_report_have_the_concurrency_column_and_the_throughput_plot(result, tmp_path):
    header, rows = table_rows(result)
    assert header[:2] == ["config", "conc"] and "mean drafted" in header and "spec off" in header
    assert [row[1] for row in rows] == ["1"] * 8 + ["2"] * 5
    llama = header.index("vs llama.cpp")
    assert rows[2][0] == "overlap k=2" and rows[2][llama] == "1.60x" and rows[-1][llama] == "-"
    spec_off = header.index("spec off")
    assert rows[-2][spec_off] == "4 (0.6 s)" and rows[0][spec_off] == "-"
    assert text_table(result).splitlines()[0].split()[:2] == ["config", "conc"]
    pytest.importorskip("matplotlib")
    written = write_report(result, tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| config | conc |" in markdown and "| overlap k=2 | 2 |" in markdown
    for plot in ("tokens_per_s.png", "tokens_per_s_by_concurrency.png", "accepted_lengths.png", "time_split.png"):
        assert (tmp_path / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot})" in markdown
    assert len(written) == 5


# --- hf target-only, batched ----------------------------------------------------------------------

class FakeTarget:
    """Stands in for a transformers model: greedy 'generation' of fixed rows, one streamer put per step."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows
        self.calls = []

    def generate(self, ids, attention_mask=None, streamer=None, **kwargs):
        self.calls.append((ids.tolist(), None if attention_mask is None else attention_mask.tolist(), kwargs))
        streamer.put(ids)
        steps = len(self.rows[0])
        for step in range(steps):
            streamer.put(torch.tensor([row[step] for row in self.rows]))
        return torch.cat([ids, torch.tensor(self.rows)], dim=1)


def test_left_padding_and_each_rows_own_tokens():
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert up_to_eos([3, 1, 1, 1], {1}) == [3, 1] and up_to_eos([3, 4], {1}) == [3, 4]


def test_hf_target_only_batches_a_round_and_counts_each_rows_tokens_up_to_eos():
    target = FakeTarget([[3, 4, 2, 2], [5, 2, 9, 9], [6, 7, 8, 4]])  # eos 2; rows 0 and 1 end early
    runner = HfRunner(target, None, 4, frozenset({2}), pad_id=9)
    prompts = [[11, 12], [13], [14, 15, 16]]
    made = runner(prompts, 3, [4, 5, 6])
    (ids, mask, kwargs), = target.calls
    assert ids == [[9, 11, 12], [9, 9, 13], [14, 15, 16]] and mask == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert kwargs["pad_token_id"] == 9 and kwargs["max_new_tokens"] == 4
    assert made.prompts == [4, 5, 6]
    assert [g.token_ids for g in made.generations] == [[3, 4, 2], [5, 2], [6, 7, 8, 4]]
    for g in made.generations:
        assert len(g.token_times) == len(g.token_ids) and g.token_times == sorted(g.token_times)
        assert g.wall_s == g.token_times[-1] <= made.wall_s
    first_steps = {g.ttft_s for g in made.generations}
    assert len(first_steps) == 1  # every row's first token came with the first step (the prefill)
    with pytest.raises(ValueError, match="one sequence at a time"):
        HfRunner(target, object(), 4, frozenset({2}))(prompts, 3)
