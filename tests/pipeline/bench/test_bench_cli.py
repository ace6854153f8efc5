"""`specpipe bench` end to end on the bundled pair (2 short prompts): its figures agree with each other. The
llama.cpp peer is a stand-in replaying a recorded stream (tests/pipeline/bench/fake_llama_server.py)."""

import json
import os
import subprocess
import sys

import pytest

from tests.pipeline.bench import fake_llama_server
from workers.bundled import DRAFT_DIR, TARGET_DIR

REQUIRED = {"name", "mode", "k", "tokens_per_s", "speedup_vs_target_only", "acceptance_rate",
            "mean_acceptance_length", "predicted_speedup"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "pipeline.cli.main", "bench", "--prompts", "2", "--k", "2,3", "--max-new-tokens", "16",
               "--json-out", str(out / "bench.json"), "--report", str(out / "report")]
    cache = out / "cache"  # the stand-in's build, in a cache of its own (the CPU kernels are built there too)
    env = dict(os.environ, SPECPIPE_CACHE=str(cache),
               **fake_llama_server.install(cache / "llama.cpp", [TARGET_DIR, DRAFT_DIR]))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result, json.loads((out / "bench.json").read_text()), out / "report"


@pytest.mark.slow
def test_every_configuration_is_reported_with_the_required_figures(bench):
    result, figures, _ = bench
    names = [config["name"] for config in figures["configs"]]
    assert names == ["target-only", "serial k=2", "overlap k=2", "serial k=3", "overlap k=3",
                     "overlap goodput k<=3", "hf target-only", "hf assisted", "llama.cpp target-only",
                     "llama.cpp spec k=2", "llama.cpp spec k=3", "llama.cpp spec k=2 p-min=0.75",
                     "llama.cpp spec k=3 p-min=0.75"]
    for config in figures["configs"]:
        assert REQUIRED <= config.keys()
        assert config["name"] in result.stdout  # the table names it too
    assert figures["identical_greedy_outputs"] is True
    settings = figures["settings"]
    assert (settings["k"], settings["max_branches"], settings["max_new_tokens"]) == ([2, 3], [12], 16)
    assert (settings["prompts"], settings["warmup"], settings["threads"]) == (2, 1, 1)
    assert "greedy outputs token-identical across all specpipe configurations: yes" in result.stdout
    # the stand-in answers every prompt with one recording: llama.cpp's rows are there, its identity is not
    assert settings["llama_cpp"] == "llama.cpp 0.5.0-fake (build 1, commit 0000000)"
    assert figures["peers_identical"]["llama.cpp spec k=3"] == "0/2"
    spec = next(config for config in figures["configs"] if config["name"] == "llama.cpp spec k=3")
    assert (spec["system"], spec["drafted"], spec["accepted"]) == ("llama.cpp", 22, 14)


@pytest.mark.slow
def test_counts_add_up_and_speedups_are_ratios_of_rates(bench):
    _, figures, _ = bench
    configs = {config["name"]: config for config in figures["configs"]}
    base, hf_base = configs["target-only"], configs["hf target-only"]
    for config in configs.values():
        assert config["sequences"] == 2 and 0 < config["tokens"] <= 2 * 16
        assert config["tokens_per_s"] == pytest.approx(config["tokens"] / config["wall_s"])
        assert config["speedup_vs_target_only"] == pytest.approx(config["tokens_per_s"] / base["tokens_per_s"])
        assert config["speedup_vs_hf_target_only"] == pytest.approx(config["tokens_per_s"] / hf_base["tokens_per_s"])
        assert config["speedup_vs_llama_cpp_target_only"] == pytest.approx(
            config["tokens_per_s"] / configs["llama.cpp target-only"]["tokens_per_s"])
        assert config["warmup"]["sequences"] == 1  # reported apart, not in the counts above
        if config["mode"] not in ("serial", "overlap"):
            continue
        k = config["k"]
        histogram = config["accepted_length_histogram"]
        assert sum(histogram) == config["verifications"] and len(histogram) <= k + 1
        assert sum(n * count for n, count in enumerate(histogram)) == config["accepted"]
        assert config["accepted"] <= config["drafted"] <= k * config["verifications"]
        assert config["acceptance_rate"] == pytest.approx(config["accepted"] / config["drafted"])
        mean_length = (config["accepted"] + config["verifications"]) / config["verifications"]
        assert config["mean_acceptance_length"] == pytest.approx(mean_length)
        # every generated token is an accepted draft, a verification's own token, or a plain decode step
        assert config["accepted"] + config["verifications"] <= config["tokens"]
        assert config["predicted_speedup"] > 0
        assert config["measured_over_predicted"] == pytest.approx(
            config["speedup_vs_target_only"] / config["predicted_speedup"])
        split = config["time_split_s"]["target"]
        assert split["busy"] + split["ipc"] + split["idle"] == pytest.approx(config["wall_s"], rel=1e-6)


@pytest.mark.slow
def test_report_holds_the_table_and_three_plots(bench):
    _, _, report = bench
    markdown = (report / "report.md").read_text()
    assert "| overlap k=3 |" in markdown and "specpipe bench" in markdown
    for plot in ("tokens_per_s.png", "accepted_lengths.png", "time_split.png"):
        assert (report / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot})" in markdown
