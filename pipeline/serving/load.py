"""`specpipe bench-serve`: load against an OpenAI-compatible server, in the manner of vLLM's benchmark_serving.

Requests stream from /v1/completions, cycling through the prompts: back to back from --concurrency clients
(--request-rate 0), or as Poisson arrivals with at most --concurrency in flight. Sending stops after --requests
or --duration, whichever comes first; requests in flight then finish. The speculation figures are deltas of
the server's Prometheus counters across the run, so they count any other traffic the server had meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import openai
from prometheus_client.parser import text_string_to_metric_families

from pipeline.prompts import select_prompts
from pipeline.serving.config import BenchServeConfig
from workers.bundled import HELDOUT_PROMPTS
from workers.sampling import MAX_SEED

REQUEST_TIMEOUT_S = 600.0  # the client's timeout: bounds how long a request in flight may still run
METRICS_TIMEOUT_S = 10.0
MAX_ERRORS = 5  # distinct error messages kept in the report
QUANTILES = (50, 90, 99)
COUNTERS = {  # report name -> the server's counter
    "drafts": "specpipe:spec_decode_num_drafts_total",
    "draft_tokens": "specpipe:spec_decode_num_draft_tokens_total",
    "accepted_tokens": "specpipe:spec_decode_num_accepted_tokens_total",
    "emitted_tokens": "specpipe:spec_decode_num_emitted_tokens_total",
    "predraft_hits": "specpipe:spec_decode_predraft_hits_total",
    "predraft_misses": "specpipe:spec_decode_predraft_misses_total",
}


class ServerUnreachable(RuntimeError):
    """The server at --url did not answer, or refused to list its models."""


def log(message: str) -> None:
    print(f"[bench-serve] {message}", file=sys.stderr, flush=True)


def percentiles(values: Sequence[float], qs: Iterable[float] = QUANTILES) -> list[float]:
    """Linear-interpolated percentiles (numpy's default method), one per q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentiles of no values")
    out = []
    for q in qs:
        position = (len(ordered) - 1) * q / 100
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        out.append(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
    return out


def latency_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 in milliseconds; None each when there are no values."""
    if not values_s:
        return {"mean": None, **{f"p{q}": None for q in QUANTILES}}
    points = percentiles(values_s, QUANTILES)
    return {"mean": statistics.fmean(values_s) * 1e3, **{f"p{q}": p * 1e3 for q, p in zip(QUANTILES, points)}}


@dataclass(frozen=True)
class RequestRecord:
    index: int
    start_s: float  # when it was sent, since the run began
    e2e_s: float
    ttft_s: float | None  # send -> first chunk carrying text
    itl_s: tuple[float, ...]  # one per token after the first chunk's
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "ok": self.ok, "error": self.error, "start_s": self.start_s,
                "ttft_ms": None if self.ttft_s is None else self.ttft_s * 1e3, "e2e_ms": self.e2e_s * 1e3, "itl_ms": [s * 1e3 for s in self.itl_s],
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason}


@dataclass(frozen=True)
class Speculation:
    """Deltas of the server's speculative-decoding counters across the run."""

    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted_tokens: float = 0.0
    emitted_tokens: float = 0.0  # accepted + one target token per draft
    predraft_hits: float = 0.0
    predraft_misses: float = 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        return self.emitted_tokens / self.drafts if self.drafts else None

    @property
    def predraft_hit_rate(self) -> float | None:
        tries = self.predraft_hits + self.predraft_misses
        return self.predraft_hits / tries if tries else None

    def to_json(self) -> dict[str, float | None]:
        return {**{name: getattr(self, name) for name in COUNTERS}, "acceptance_rate": self.acceptance_rate,
                "mean_acceptance_length": self.mean_acceptance_length, "predraft_hit_rate": self.predraft_hit_rate}


@dataclass(frozen=True)
class Warmup:
    """The --warmup requests sent before the measured ones and left out of every figure."""

    requests: int = 0
    failed: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True)
class LoadReport:
    machine: dict[str, object]
    date: str
    url: str
    model: str
    settings: dict[str, object]
    completed: int
    failed: int
    errors: tuple[tuple[str, int], ...]  # the first distinct messages, with how many requests got each
    duration_s: float  # first send to last finish
    request_throughput: float  # completed requests per second
    output_token_throughput: float  # completed requests' generated tokens per second
    total_token_throughput: float  # completed requests' prompt and generated tokens per second
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    speculation: Speculation | None  # None when /metrics could not be read
    metrics_error: str | None
    requests: tuple[RequestRecord, ...]
    warmup: Warmup

    def to_json(self, with_requests: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "machine": self.machine, "date": self.date, "url": self.url, "model": self.model,
            "settings": self.settings, "completed": self.completed, "failed": self.failed,
            "errors": [{"message": message, "count": count} for message, count in self.errors],
            "duration_s": self.duration_s, "request_throughput": self.request_throughput,
            "output_token_throughput": self.output_token_throughput,
            "total_token_throughput": self.total_token_throughput,
            "ttft_ms": self.ttft_ms, "itl_ms": self.itl_ms, "e2e_ms": self.e2e_ms,
            "speculation": None if self.speculation is None else self.speculation.to_json(),
            "metrics_error": self.metrics_error, "warmup": asdict(self.warmup),
        }
        if with_requests:
            out["requests"] = [record.to_json() for record in self.requests]
        return out


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()}


def _read_counters(url: str, api_key: str) -> dict[str, float]:
    """The speculation counters /metrics shows now (summed over labels; 0 for one it lacks)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url + "/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=METRICS_TIMEOUT_S) as response:
        text = response.read().decode()
    wanted = {counter: name for name, counter in COUNTERS.items()}
    values = dict.fromkeys(COUNTERS, 0.0)
    # the parser may strip `_total` from a counter's family name, never from its samples'
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                values[wanted[sample.name]] += sample.value
    return values


async def read_counters(url: str, api_key: str) -> tuple[dict[str, float] | None, str | None]:
    """(counters, None), or (None, why not)."""
    try:
        return await asyncio.to_thread(_read_counters, url, api_key), None
    except (OSError, ValueError) as error:
        return None, f"cannot read {url}/metrics: {error}"


def error_text(error: Exception) -> str:
    if isinstance(error, openai.APIStatusError):
        body = error.body
        message = body.get("message") if isinstance(body, dict) else None
        return f"HTTP {error.status_code}: {message or error.message}"
    if isinstance(error, openai.APITimeoutError):
        return "timed out"
    if isinstance(error, openai.APIConnectionError):
        return f"connection failed: {error.__cause__ or error}"
    if isinstance(error, openai.APIError):
        return error.message
    return f"{type(error).__name__}: {error}"


def _chunk_tokens(choice: object) -> int:
    token_ids = getattr(choice, "token_ids", None)  # specpipe's extension of the completion chunk
    if isinstance(token_ids, list):
        return len(token_ids)
    return 1 if getattr(choice, "text", "") else 0


def request_seed(seed: int, index: int) -> int:
    """Request `index`'s seed: a run is repeatable (the server samples each request from its seed alone),
    and its requests do not all draw the same noise."""
    return (seed + index) % MAX_SEED


async def one_request(client: openai.AsyncOpenAI, config: BenchServeConfig, model: str, index: int, prompt: str,
                      t0: float) -> RequestRecord:
    sampling = config.sampling
    extra_body: dict[str, object] = {"return_token_ids": True}
    if sampling.top_k:
        extra_body["top_k"] = sampling.top_k
    ttft = last_text_at = finish = usage = None
    itl: list[float] = []
    tokens = pending = 0  # pending: tokens since the last chunk that carried text
    error = None
    sent = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=config.load.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, seed=request_seed(sampling.seed, index), stream=True,
            stream_options={"include_usage": True}, extra_body=extra_body)
        async with stream:
            async for chunk in stream:
                now = time.perf_counter()
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    count = _chunk_tokens(choice)
                    tokens += count
                    pending += count
                    if choice.text:
                        if last_text_at is None:
                            ttft = now - sent  # this chunk's tokens all arrive with the first: no ITL for them
                        else:
                            gap_tokens = max(pending, 1)
                            itl.extend([(now - last_text_at) / gap_tokens] * gap_tokens)
                        last_text_at, pending = now, 0
                    finish = choice.finish_reason or finish
        if finish is None:
            error = "the stream ended without a finish_reason"
    except Exception as caught:  # noqa: BLE001 - every failure is a figure of the run, not a crash
        error = error_text(caught)
    done = time.perf_counter()
    return RequestRecord(
        index=index, start_s=sent - t0, e2e_s=done - sent, ttft_s=ttft, itl_s=tuple(itl),
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else tokens,
        finish_reason=finish, error=error)


async def send_all(client: openai.AsyncOpenAI, config: BenchServeConfig, model: str,
                   prompts: Sequence[str]) -> list[RequestRecord]:
    load = config.load
    t0 = time.perf_counter()
    deadline = t0 + load.duration_s
    in_flight = asyncio.Semaphore(load.concurrency)
    records: list[RequestRecord] = []
    step = max(1, load.num_requests // 10)

    async def send(index: int) -> None:
        async with in_flight:
            if time.perf_counter() >= deadline:  # waited for a slot past --duration: not sent
                return
            records.append(await one_request(client, config, model, index, prompts[index % len(prompts)], t0))
        if len(records) % step == 0:
            failed = sum(not r.ok for r in records)
            log(f"{len(records)}/{load.num_requests} answered ({failed} failed), {time.perf_counter() - t0:.1f} s")

    if load.request_rate == 0:
        indices = itertools.count()

        async def client_loop() -> None:
            while (index := next(indices)) < load.num_requests and time.perf_counter() < deadline:
                await send(index)

        await asyncio.gather(*(client_loop() for _ in range(load.concurrency)))
    else:
        rng = random.Random(config.sampling.seed)
        tasks = []
        for index in range(load.num_requests):
            if index:
                await asyncio.sleep(min(rng.expovariate(load.request_rate), max(0.0, deadline - time.perf_counter())))
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(send(index)))
        await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: r.index)


async def find_model(client: openai.AsyncOpenAI, config: BenchServeConfig) -> str:
    """--served-model-name, or the server's first model; asking also checks the server answers."""
    url = config.load.url
    try:
        models = [model.id async for model in client.models.list()]
    except openai.APIStatusError as error:
        option = " (--api-key)" if error.status_code in (401, 403) else ""
        raise ServerUnreachable(f"the server at {url} refused to list its models{option}: "
                                f"{error_text(error)}") from None
    except openai.APIError as error:
        raise ServerUnreachable(f"cannot reach the server at {url} (--url): {error_text(error)}") from None
    if config.load.served_model_name:
        return config.load.served_model_name
    if not models:
        raise ServerUnreachable(f"the server at {url} lists no models; name one with --served-model-name")
    return models[0]


def settings(config: BenchServeConfig, prompts: int) -> dict[str, object]:
    load, sampling = config.load, config.sampling
    return {"num_requests": load.num_requests, "concurrency": load.concurrency, "request_rate": load.request_rate,
            "duration_s": load.duration_s, "max_new_tokens": load.max_new_tokens, "prompts": prompts,
            "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            "seed": sampling.seed}


def summarize(config: BenchServeConfig, model: str, prompts: int, records: Sequence[RequestRecord],
              speculation: Speculation | None, metrics_error: str | None, warmup: Warmup = Warmup()) -> LoadReport:
    done = [r for r in records if r.ok]
    duration = (max(r.start_s + r.e2e_s for r in records) - min(r.start_s for r in records)) if records else 0.0

    def rate(amount: float) -> float:
        return amount / duration if duration > 0 else 0.0

    output_tokens = sum(r.completion_tokens for r in done)
    errors = Counter(r.error for r in records if r.error is not None)  # keeps first-seen order
    return LoadReport(
        machine=machine(), date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        url=config.load.url, model=model, settings=settings(config, prompts), completed=len(done),
        failed=len(records) - len(done), errors=tuple(itertools.islice(errors.items(), MAX_ERRORS)),
        duration_s=duration, request_throughput=rate(len(done)), output_token_throughput=rate(output_tokens),
        total_token_throughput=rate(output_tokens + sum(r.prompt_tokens for r in done)),
        ttft_ms=latency_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        itl_ms=latency_ms([gap for r in done for gap in r.itl_s]), e2e_ms=latency_ms([r.e2e_s for r in done]),
        speculation=speculation, metrics_error=metrics_error, requests=tuple(records), warmup=warmup)


async def run_load(config: BenchServeConfig, *, timeout_s: float = REQUEST_TIMEOUT_S) -> LoadReport:
    """Runs the load and measures it. Raises ValueError for bad settings, ServerUnreachable when the server at
    --url does not answer."""
    config.load.validate()
    config.sampling.validate()
    load = config.load
    url = load.url.rstrip("/")
    selected = select_prompts(config.prompts, bundled=HELDOUT_PROMPTS)
    prompts = selected.measured
    if not prompts:
        raise ValueError("no prompts to send: give --prompt or a --prompts-file with lines")
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=load.api_key or "none", max_retries=0,
                                  timeout=timeout_s) as client:
        model = await find_model(client, config)
        warmup = await warm_up(client, config, model, selected.warmup)
        before, metrics_error = await read_counters(url, load.api_key)
        if metrics_error:
            log(f"{metrics_error}; going on without the speculation figures")
        rate = f"{load.request_rate:g} req/s" if load.request_rate else "back to back"
        log(f"sending up to {load.num_requests} requests to {url} (model {model}) for at most {load.duration_s:g} s, "
            f"{rate}, at most {load.concurrency} in flight")
        records = await send_all(client, config, model, prompts)
    speculation = None
    if before is not None:
        after, metrics_error = await read_counters(url, load.api_key)
        if after is None:
            log(f"{metrics_error}; going on without the speculation figures")
        else:
            speculation = Speculation(**{name: after[name] - before[name] for name in COUNTERS})
    return summarize(config, model, len(prompts), records, speculation, metrics_error, warmup)


async def warm_up(client: openai.AsyncOpenAI, config: BenchServeConfig, model: str,
                  prompts: Sequence[str]) -> Warmup:
    """Each warm-up prompt once, at most --concurrency in flight, before the counters are first read."""
    if not prompts:
        return Warmup()
    log(f"warming up with {len(prompts)} request(s), left out of the figures")
    in_flight = asyncio.Semaphore(config.load.concurrency)
    t0 = time.perf_counter()

    async def send(index: int, prompt: str) -> RequestRecord:
        async with in_flight:
            return await one_request(client, config, model, index, prompt, t0)

    records = await asyncio.gather(*(send(index, prompt) for index, prompt in enumerate(prompts)))
    return Warmup(len(records), sum(not r.ok for r in records), time.perf_counter() - t0)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def text_table(report: LoadReport) -> str:
    """One figure a line, aligned; the machine and date first."""
    m, s = report.machine, report.settings
    rate = f"{s['request_rate']:g} req/s (Poisson)" if s["request_rate"] else "back to back"
    rows = [
        ("Date", report.date),
        ("Machine", f"{m['platform']}, {m['cpu']}, {m['cores']} cores"),
        ("Server", f"{report.url} (model {report.model})"),
        ("Load", f"{s['num_requests']} requests, {rate}, at most {s['concurrency']} in flight, "
                 f"{s['duration_s']:g} s at most, {s['max_new_tokens']} max tokens"),
        ("Sampling", f"temperature {s['temperature']:g}, top-k {s['top_k']}, top-p {s['top_p']:g}, "
                     f"seed {s['seed']}"),
        ("Warm-up (left out)", f"{report.warmup.requests} requests, {report.warmup.failed} failed, "
                               f"{report.warmup.duration_s:.2f} s"),
        ("Completed requests", str(report.completed)),
        ("Failed requests", str(report.failed)),
        ("Duration (s)", f"{report.duration_s:.2f}"),
        ("Request throughput (req/s)", f"{report.request_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{report.output_token_throughput:.1f}"),
        ("Total token throughput (tok/s)", f"{report.total_token_throughput:.1f}"),
    ]
    for label, figures in (("TTFT", report.ttft_ms), ("ITL", report.itl_ms), ("E2E latency", report.e2e_ms)):
        rows += [(f"{key.capitalize()} {label} (ms)", _fmt(value, ".2f")) for key, value in figures.items()]
    spec = report.speculation
    if spec is None:
        rows.append(("Speculation", f"unknown ({report.metrics_error})"))
    else:
        rows += [("Acceptance rate", _fmt(spec.acceptance_rate, ".3f")),
                 ("Mean acceptance length", _fmt(spec.mean_acceptance_length, ".2f")),
                 ("Pre-draft hit rate", _fmt(spec.predraft_hit_rate, ".3f"))]
    rows += [("Error", f"{count} x {message}") for message, count in report.errors]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def run_bench_serve(config: BenchServeConfig) -> int:
    """Runs `specpipe bench-serve` and prints its figures; returns the exit status: 0, or 1 when the server
    could not be reached or no request completed. Bad settings raise ValueError."""
    if config.json_out is not None and not config.json_out.parent.is_dir():
        raise ValueError(f"--json-out: the directory {config.json_out.parent} does not exist")
    try:
        report = asyncio.run(run_load(config))
    except ServerUnreachable as error:
        print(f"specpipe: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("specpipe: interrupted", file=sys.stderr, flush=True)
        return 130
    if config.output.json_lines:
        print(json.dumps(report.to_json()), flush=True)
    else:
        print(text_table(report), flush=True)
    if config.json_out is not None:
        config.json_out.write_text(json.dumps(report.to_json(with_requests=True), indent=2) + "\n")
        log(f"figures: {config.json_out}")
    if report.completed == 0:
        first = f": {report.errors[0][0]}" if report.errors else ""
        print(f"specpipe: error: no request completed{first}", file=sys.stderr, flush=True)
        return 1
    return 0
