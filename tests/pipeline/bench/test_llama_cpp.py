"""The llama.cpp peer without llama.cpp: its server's recorded streams parsed, its process driven through a
stand-in that replays them, and bench going on without it when it was never built."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.bench.config import BenchConfig
from pipeline.bench.llama_cpp import (
    BUILD_COMMAND,
    LlamaCppBuild,
    LlamaCppRunner,
    LlamaServer,
    ServerConfig,
    fingerprint,
    parse_stream,
    to_generation,
)
from pipeline.bench.run import llama_cpp_build, llama_cpp_contenders
from pipeline.config import ModelsConfig
from tests.pipeline.bench import fake_llama_server
from workers.bundled import DRAFT_DIR, TARGET_DIR

DATA = fake_llama_server.RECORDINGS
# llama-server 0.5.0-dev (commit 0c1e570), the bundled target, prompt "def add(a, b):\n    return a + b\n"
TARGET_ONLY_TOKENS = [199, 481, 902, 63, 66, 3051]


def recorded(name: str, gap: float = 0.003) -> list[tuple[float, str]]:
    lines = (DATA / name).read_text().splitlines()
    return [(gap * i, line) for i, line in enumerate(lines)]


def test_a_recorded_target_only_stream_gives_its_tokens_times_and_timings():
    completion = parse_stream(recorded("llama_server_target_only.sse"))
    assert completion.token_ids == TARGET_ONLY_TOKENS
    assert completion.stop_type == "limit"
    assert len(completion.token_times) == 6 and completion.token_times == sorted(completion.token_times)
    assert completion.timings["prompt_n"] == 13 and completion.timings["predicted_n"] == 6
    generation = to_generation(completion)
    assert generation.ttft_s == completion.token_times[0] and generation.wall_s == completion.token_times[-1]
    assert (generation.drafted, generation.accepted) == (0, 0)


def test_a_recorded_speculative_stream_carries_what_was_drafted_and_accepted():
    generation = to_generation(parse_stream(recorded("llama_server_spec_k3.sse")))
    assert generation.token_ids[:6] == TARGET_ONLY_TOKENS  # lossless: it begins as the target alone does
    assert len(generation.token_ids) == 12
    assert (generation.drafted, generation.accepted) == (11, 7)


def test_the_eos_the_server_stops_at_is_one_of_its_tokens_as_in_ours():
    completion = parse_stream(recorded("llama_server_eos.sse"))
    assert completion.stop_type == "eos" and completion.token_ids == [0]  # the bundled target's EOS


def test_an_error_event_is_an_error_and_other_lines_are_skipped():
    assert parse_stream([(0.0, ": keep-alive"), (0.0, ""), (0.1, 'data: {"tokens": [5], "stop": false}'),
                         (0.2, "data: [DONE]"), (0.3, 'data: {"tokens": [6]}')]).token_ids == [5]
    with pytest.raises(RuntimeError, match="llama-server: the context is full"):
        parse_stream([(0.0, 'data: {"error": {"code": 400, "message": "the context is full"}}')])


def test_a_configuration_is_one_server_with_every_core_for_each_model():
    target_only = ServerConfig(Path("t.gguf"), threads=2).command(Path("llama-server"), 8000)
    assert target_only[:3] == ["llama-server", "-m", "t.gguf"] and "-md" not in target_only
    assert target_only[target_only.index("-t") + 1] == "2" and target_only[target_only.index("-np") + 1] == "1"
    speculative = ServerConfig(Path("t.gguf"), Path("d.gguf"), 3, threads=2).command(Path("llama-server"), 8000)
    assert speculative[speculative.index("-md") + 1] == "d.gguf"
    assert speculative[speculative.index("--spec-draft-n-max") + 1] == "3"
    assert speculative[speculative.index("--spec-type") + 1] == "draft-simple"
    assert speculative[speculative.index("-td") + 1] == "2"
    assert "--spec-draft-p-min" not in speculative  # the server's default
    p_min = ServerConfig(Path("t.gguf"), Path("d.gguf"), 3, draft_p_min=0.75).command(Path("llama-server"), 8000)
    assert p_min[p_min.index("--spec-draft-p-min") + 1] == "0.75"


def test_llama_cpp_runs_at_its_default_p_min_and_another_for_each_k():
    contenders = llama_cpp_contenders((2, 3))
    assert [(c.k, c.draft_p_min) for c in contenders if c.mode == "llama.cpp-speculative"] == [
        (2, None), (3, None), (2, 0.75), (3, 0.75)]


def test_a_gguf_is_found_by_its_checkpoints_content(tmp_path):
    copy = tmp_path / "draft"
    shutil.copytree(DRAFT_DIR, copy)
    build = LlamaCppBuild(tmp_path / "cache")
    assert build.gguf(copy).name == build.gguf(DRAFT_DIR).name  # the same model, wherever it lies
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"rms_norm_eps": 1e-05',
                                                                                  '"rms_norm_eps": 1e-06'))
    assert fingerprint(copy) != fingerprint(DRAFT_DIR)


def test_what_is_missing_is_said_with_the_command_that_makes_it(tmp_path):
    build = LlamaCppBuild(tmp_path)
    assert "no llama.cpp build" in build.missing([TARGET_DIR]) and BUILD_COMMAND in build.missing([TARGET_DIR])
    build.bin_dir.mkdir(parents=True)
    build.server.write_text("")
    message = build.missing([TARGET_DIR, DRAFT_DIR])
    assert f"no GGUF of {TARGET_DIR}, {DRAFT_DIR}" in message and "--target DIR --draft DIR" in message
    for checkpoint in (TARGET_DIR, DRAFT_DIR):
        build.gguf(checkpoint).parent.mkdir(parents=True, exist_ok=True)
        build.gguf(checkpoint).write_bytes(b"GGUF")
    assert build.missing([TARGET_DIR, DRAFT_DIR]) == ""


def test_bench_goes_on_without_llama_cpp_and_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECPIPE_CACHE", str(tmp_path))
    assert llama_cpp_build(BenchConfig()) is None
    err = capsys.readouterr().err
    assert "the llama.cpp peer is left out" in err and BUILD_COMMAND in err
    assert llama_cpp_build(BenchConfig(peers=("transformers",))) is None
    assert capsys.readouterr().err == ""  # not asked for: nothing to say
    with pytest.raises(ValueError, match="--peers"):
        BenchConfig(peers=("vllm",)).validate()


@pytest.fixture
def fake_build(tmp_path, monkeypatch) -> LlamaCppBuild:
    """A build whose llama-server is the stand-in, replaying the speculative recording."""
    for name, value in fake_llama_server.install(tmp_path / "llama.cpp").items():
        monkeypatch.setenv(name, value)
    return LlamaCppBuild(tmp_path / "llama.cpp")


def test_a_server_runs_a_round_from_token_ids_pinned_where_it_was_told(fake_build):
    cores = tuple(sorted(os.sched_getaffinity(0)))[:1]
    server = LlamaServer(fake_build, ServerConfig(Path("t.gguf"), Path("d.gguf"), 3, cores=cores))
    try:
        round_ = LlamaCppRunner(server, 12)([[481, 902, 7]], 1, [5])
        again = LlamaCppRunner(server, 12)([[8]], 1, [6])  # a second request on the same server
    finally:
        server.close()
    assert server.process.poll() is not None  # closed means gone
    (generation,) = round_.generations
    assert round_.prompts == [5] and again.prompts == [6]
    assert generation.token_ids[:6] == TARGET_ONLY_TOKENS and (generation.drafted, generation.accepted) == (11, 7)
    assert round_.wall_s == generation.wall_s > 0
    log = [json.loads(line) for line in (fake_build.root / "requests.jsonl").read_text().splitlines()]
    started, first, second = log
    assert started["cores"] == list(cores) and started["argv"][started["argv"].index("--spec-draft-n-max") + 1] == "3"
    assert first["request"]["prompt"] == [481, 902, 7] and second["request"]["prompt"] == [8]
    assert first["request"]["cache_prompt"] is False and first["request"]["temperature"] == 0.0
    assert first["request"]["n_predict"] == 12
    with pytest.raises(ValueError, match="one prompt at a time"):
        LlamaCppRunner(server, 12)([[1], [2]], 2)


def test_a_server_that_dies_at_start_is_named_with_its_last_line(fake_build):
    fake_build.server.write_text("#!/bin/sh\necho 'error: failed to load model t.gguf'\nexit 1\n")
    with pytest.raises(RuntimeError, match="exited with status 1 before it was ready: error: failed to load model"):
        LlamaServer(fake_build, ServerConfig(Path("t.gguf")))


def test_bench_finds_a_build_holding_both_models(fake_build, monkeypatch):
    monkeypatch.setenv("SPECPIPE_CACHE", str(fake_build.root.parent))
    fake_llama_server.install(fake_build.root, [TARGET_DIR, DRAFT_DIR])
    found = llama_cpp_build(BenchConfig(models=ModelsConfig()))
    assert found == fake_build and found.version() == "llama.cpp 0.5.0-fake (build 1, commit 0000000)"
