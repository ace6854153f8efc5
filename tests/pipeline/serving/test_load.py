"""`specpipe bench-serve`'s engine against a stub OpenAI-compatible server running in a thread."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from pipeline.config import OutputConfig, PromptsConfig
from pipeline.serving.config import BenchServeConfig, LoadConfig
from pipeline.serving.load import percentiles, run_bench_serve, run_load
from workers.sampling import SamplingParams

PROMPTS = ("one two three", "four five")
# per request the stub counts 2 drafts of 3 tokens, 4 of them accepted, and one pre-draft hit and one miss
PER_REQUEST = {"num_drafts": 2, "num_draft_tokens": 6, "num_accepted_tokens": 4, "num_emitted_tokens": 6,
               "predraft_hits": 1, "predraft_misses": 1}


@dataclass
class Stub:
    """How the stub answers, and what it saw."""

    tokens_per_chunk: int = 2
    chunk_delay_s: float = 0.0
    fail_every: int = 0  # every Nth request gets a 429; 0 = none
    finish: bool = True  # False: the stream ends without a finish_reason
    speculates: bool = True  # False: a target-only server, its counters never move
    metrics: bool = True  # False: /metrics answers 404
    received: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: list[dict] = field(default_factory=list)


class StubServer:
    def __init__(self) -> None:
        self.stub = Stub()
        self.registry = CollectorRegistry()
        self.counters = {name: Counter(f"specpipe:spec_decode_{name}", name, registry=self.registry)
                         for name in PER_REQUEST}
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/completions")(self.completions)
        self.app.get("/metrics")(self.metrics)

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 0, "owned_by": "t"}]}

    async def metrics(self) -> Response:
        if not self.stub.metrics:
            return Response("no metrics here", status_code=404)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, request: Request) -> Response:
        stub, body = self.stub, await request.json()
        stub.received += 1
        stub.bodies.append(body)
        if stub.fail_every and stub.received % stub.fail_every == 0:
            return JSONResponse({"error": {"message": "too many requests waiting", "type": "rate_limit",
                                           "code": 429}}, status_code=429)
        stub.in_flight += 1
        stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
        return StreamingResponse(self.stream(body), media_type="text/event-stream")

    async def stream(self, body: dict) -> Iterator[str]:
        stub = self.stub
        try:
            def event(choices: list, **extra) -> str:
                return "data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0,
                                              "model": body["model"], "choices": choices, **extra}) + "\n\n"

            total = body["max_tokens"]
            for start in range(0, total, stub.tokens_per_chunk):
                await asyncio.sleep(stub.chunk_delay_s)
                ids = list(range(start, min(start + stub.tokens_per_chunk, total)))
                yield event([{"index": 0, "text": "".join(f" t{i}" for i in ids), "token_ids": ids,
                              "finish_reason": None, "logprobs": None}])
            if stub.speculates:
                for name, amount in PER_REQUEST.items():
                    self.counters[name].inc(amount)
            if stub.finish:
                yield event([{"index": 0, "text": "", "token_ids": [], "finish_reason": "length", "logprobs": None}])
            if body.get("stream_options", {}).get("include_usage"):
                prompt_tokens = len(body["prompt"].split())
                yield event([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": total,
                                       "total_tokens": prompt_tokens + total})
            yield "data: [DONE]\n\n"
        finally:
            stub.in_flight -= 1


@pytest.fixture(scope="module")
def server() -> Iterator[StubServer]:
    stub_server = StubServer()
    uv = uvicorn.Server(uvicorn.Config(stub_server.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the stub server did not start"
        time.sleep(0.01)
    stub_server.url = f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    yield stub_server
    uv.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def stub(server: StubServer) -> Stub:
    server.stub = Stub()
    return server.stub


def config(url: str, json_out=None, json_lines: bool = False, sampling: SamplingParams = SamplingParams(),
           **load) -> BenchServeConfig:
    load = {"num_requests": 6, "concurrency": 2, "max_new_tokens": 8, **load}
    return BenchServeConfig(load=LoadConfig(url=url, **load), prompts=PromptsConfig(texts=PROMPTS),
                            sampling=sampling, output=OutputConfig(json_lines=json_lines), json_out=json_out)


def test_percentiles_on_known_lists():
    assert percentiles([1, 2, 3, 4, 5], (50, 90, 99)) == pytest.approx([3, 4.6, 4.96])
    assert percentiles([5, 1, 3], (0, 50, 100)) == [1, 3, 5]  # order of the input does not matter
    assert percentiles([7.0], (50, 99)) == [7.0, 7.0]
    with pytest.raises(ValueError):
        percentiles([], (50,))


def test_every_request_completes_with_its_token_counts(server, stub):
    stub.chunk_delay_s = 0.01
    report = asyncio.run(run_load(config(server.url, num_requests=6, max_new_tokens=8,
                                         sampling=SamplingParams(temperature=0.5, top_k=5, seed=3))))
    assert (report.completed, report.failed, report.errors, report.model) == (6, 0, (), "stub-model")
    assert [r.completion_tokens for r in report.requests] == [8] * 6
    assert [r.prompt_tokens for r in report.requests] == [3, 2] * 3  # the prompts, cycled
    assert {r.finish_reason for r in report.requests} == {"length"}
    # 4 chunks of 2 tokens: the first chunk's 2 come with the TTFT, each later gap is split over its 2 tokens
    assert all(len(r.itl_s) == 6 for r in report.requests)
    assert 3 < report.itl_ms["mean"] < 40
    assert report.ttft_ms["p50"] <= report.e2e_ms["p50"]
    assert report.output_token_throughput == pytest.approx(48 / report.duration_s)
    assert report.total_token_throughput == pytest.approx((48 + 15) / report.duration_s)
    body = stub.bodies[0]
    assert (body["model"], body["max_tokens"], body["temperature"], body["seed"]) == ("stub-model", 8, 0.5, 3)
    assert (body["top_k"], body["return_token_ids"], body["stream"]) == (5, True, True)
    assert sorted(body["seed"] for body in stub.bodies) == [3, 4, 5, 6, 7, 8]  # repeatable, and each its own


def test_top_k_is_left_out_when_off(server, stub):
    asyncio.run(run_load(config(server.url, num_requests=1)))
    assert "top_k" not in stub.bodies[0]


def test_failed_requests_are_counted_with_the_servers_message(server, stub):
    stub.fail_every = 3
    report = asyncio.run(run_load(config(server.url, num_requests=9, concurrency=1)))
    assert (report.completed, report.failed) == (6, 3)
    assert report.errors == (("HTTP 429: too many requests waiting", 3),)
    assert report.request_throughput == pytest.approx(6 / report.duration_s)


def test_a_stream_without_a_finish_reason_is_a_failure(server, stub):
    stub.finish = False
    report = asyncio.run(run_load(config(server.url, num_requests=2)))
    assert report.failed == 2
    assert report.errors == (("the stream ended without a finish_reason", 2),)


def test_the_duration_bound_stops_sending(server, stub):
    stub.chunk_delay_s = 0.05  # 4 chunks: a request takes 0.2 s or more
    started = time.monotonic()
    report = asyncio.run(run_load(config(server.url, num_requests=100, concurrency=2, duration_s=0.5)))
    assert time.monotonic() - started < 2.5
    assert 2 <= stub.received <= 10
    assert report.completed == stub.received  # the ones in flight at the deadline finished


def test_poisson_arrivals_keep_at_most_concurrency_in_flight(server, stub):
    stub.chunk_delay_s = 0.02
    report = asyncio.run(run_load(config(server.url, num_requests=24, concurrency=3, request_rate=200)))
    assert report.completed == 24
    assert stub.max_in_flight == 3


def test_poisson_arrivals_follow_the_seeded_gaps(server, stub):
    seed, rate = 7, 20.0
    report = asyncio.run(run_load(config(server.url, num_requests=8, concurrency=8, request_rate=rate,
                                         sampling=SamplingParams(seed=seed))))
    rng = random.Random(seed)
    expected = [0.0]
    for _ in range(7):
        expected.append(expected[-1] + rng.expovariate(rate))
    assert [r.start_s for r in report.requests] == pytest.approx(expected, abs=0.05)


def test_acceptance_figures_are_the_servers_counter_deltas(server, stub):
    stub.fail_every = 4  # a refused request moves no counter
    report = asyncio.run(run_load(config(server.url, num_requests=8, concurrency=1)))
    spec = report.speculation
    assert report.completed == 6 and report.metrics_error is None
    assert (spec.drafts, spec.draft_tokens, spec.accepted_tokens, spec.emitted_tokens) == (12, 36, 24, 36)
    assert spec.acceptance_rate == pytest.approx(4 / 6)
    assert spec.mean_acceptance_length == pytest.approx(3.0)
    assert spec.predraft_hit_rate == pytest.approx(0.5)


def test_a_target_only_server_has_no_acceptance_figures(server, stub):
    stub.speculates = False
    spec = asyncio.run(run_load(config(server.url, num_requests=2))).speculation
    assert (spec.drafts, spec.acceptance_rate, spec.mean_acceptance_length, spec.predraft_hit_rate) == (
        0, None, None, None)


def test_unreadable_metrics_are_said_and_the_run_goes_on(server, stub, capsys):
    stub.metrics = False
    report = asyncio.run(run_load(config(server.url, num_requests=2)))
    assert report.completed == 2 and report.speculation is None
    assert "/metrics" in report.metrics_error and "404" in report.metrics_error
    assert "[bench-serve] cannot read" in capsys.readouterr().err


def test_json_has_the_documented_keys(server, stub, tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert run_bench_serve(config(server.url, json_out=out, json_lines=True, num_requests=3)) == 0
    summary = json.loads(capsys.readouterr().out)
    keys = {"machine", "date", "url", "model", "settings", "completed", "failed", "errors", "duration_s",
            "request_throughput", "output_token_throughput", "total_token_throughput", "ttft_ms", "itl_ms",
            "e2e_ms", "speculation", "metrics_error", "warmup"}
    assert set(summary) == keys
    assert set(summary["machine"]) == {"platform", "cpu", "cores"}
    for figure in ("ttft_ms", "itl_ms", "e2e_ms"):
        assert set(summary[figure]) == {"mean", "p50", "p90", "p99"}
    assert set(summary["speculation"]) == {"drafts", "draft_tokens", "accepted_tokens", "emitted_tokens",
                                           "predraft_hits", "predraft_misses", "acceptance_rate",
                                           "mean_acceptance_length", "predraft_hit_rate"}
    written = json.loads(out.read_text())
    assert set(written) == keys | {"requests"}
    assert len(written["requests"]) == 3 and written["requests"][0]["completion_tokens"] == 8


def test_the_table_states_machine_date_and_figures(server, stub, capsys):
    assert run_bench_serve(config(server.url, num_requests=2)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Date") and lines[1].startswith("Machine")
    assert any(line.split()[:3] == ["Completed", "requests", "2"] for line in lines)
    assert any(line.startswith("Mean acceptance length") and line.endswith("3.00") for line in lines)
    assert len({re.match(r".*?\S {2,}", line).end() for line in lines}) == 1  # the values in one column


def test_an_unreachable_url_is_exit_status_1(capsys):
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert run_bench_serve(config(f"http://127.0.0.1:{port}")) == 1
    assert f"cannot reach the server at http://127.0.0.1:{port} (--url)" in capsys.readouterr().err


def test_no_completed_request_is_exit_status_1(server, stub, capsys):
    stub.fail_every = 1
    assert run_bench_serve(config(server.url, num_requests=2)) == 1
    assert "no request completed: HTTP 429" in capsys.readouterr().err


def test_warmup_requests_go_first_and_are_left_out_of_every_figure(server, stub, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('"warm one"\n"warm two"\n"measured"\n')
    load = config(server.url, num_requests=4)
    load = BenchServeConfig(load=load.load, prompts=PromptsConfig(file=prompts_file, warmup=2))
    report = asyncio.run(run_load(load))
    assert [body["prompt"] for body in stub.bodies] == ["warm one", "warm two"] + ["measured"] * 4
    assert (report.completed, len(report.requests)) == (4, 4)
    assert (report.warmup.requests, report.warmup.failed) == (2, 0) and report.warmup.duration_s > 0
    assert report.to_json()["warmup"]["requests"] == 2
