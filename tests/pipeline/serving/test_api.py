"""The OpenAI API of `specpipe serve`, driven by the real `openai` client against the app on 127.0.0.1, with
both models in this process (what runs behind the API is the same engine `specpipe launch` drives)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.algorithm.generation import generate
from pipeline.config import DecodeConfig
from pipeline.runtime.in_process import LocalTransport
from pipeline.serving.config import HttpConfig
from tests.pipeline.serving.servers import CONTEXT, MODEL, in_process_server
from workers.bundled import HELDOUT_PROMPTS, TARGET_DIR
from workers.model import ModelRunner

pytestmark = pytest.mark.slow

DECODE = DecodeConfig(mode="overlap", k=3, max_new_tokens=24, max_seqs=16, k_policy="fixed")
PROMPTS = [json.loads(line)[:200] for line in HELDOUT_PROMPTS.read_text().splitlines()[:8]]


@pytest.fixture(scope="module")
def server():
    with in_process_server(DECODE) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(server) -> dict[str, list[int]]:
    """prompt text -> the target's own greedy tokens for it (target-only, no server), DECODE.max_new_tokens."""
    ids = [server.tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPTS]
    target = ModelRunner.from_checkpoint(TARGET_DIR, n_slots=4, max_seq_len=CONTEXT)
    config = DecodeConfig(mode="target-only", max_new_tokens=DECODE.max_new_tokens)
    sequences, _ = generate(LocalTransport(None, target), ids, config, server.engine.limits, concurrency=4)
    return {text: sequence.generated for text, sequence in zip(PROMPTS, sequences)}


def scrape(server) -> dict[str, float]:
    """sample name (labels dropped) -> value, summed over labels, from GET /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """A raw POST (for bodies no client would send): status, JSON body, headers."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


# --- completions and chat ---------------------------------------------------------------------------


def test_completions_are_the_targets_greedy_tokens_streamed_or_not(server, client, expected):
    prompt = PROMPTS[0]
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=DECODE.max_new_tokens, temperature=0,
                                      extra_body={"return_token_ids": True})
    choice = whole.choices[0]
    assert choice.model_extra["token_ids"] == expected[prompt]
    assert choice.text == server.tokenizer.decode(expected[prompt], skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert whole.usage.prompt_tokens == len(server.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert whole.usage.completion_tokens == DECODE.max_new_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + DECODE.max_new_tokens

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=DECODE.max_new_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]] == expected[prompt]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == DECODE.max_new_tokens
    assert len({c.id for c in chunks}) == 1


def test_max_tokens_defaults_to_the_servers_max_new_tokens(server, client, expected):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1])
    assert whole.usage.completion_tokens == DECODE.max_new_tokens


def test_chat_renders_the_messages_with_the_chat_template(server, client):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    rendered = server.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    as_completion = client.completions.create(model=MODEL, prompt=rendered, max_tokens=12, temperature=0)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == as_completion.choices[0].text
    assert chat.usage == as_completion.usage

    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == as_completion.choices[0].text
    assert stream[-1].choices[0].finish_reason == "length"


def test_chat_without_a_template_is_a_clear_400():
    with in_process_server(DecodeConfig(mode="target-only", max_new_tokens=4), chat_template=None) as bare:
        client = openai.OpenAI(base_url=bare.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert client.completions.create(model=MODEL, prompt="def f():", max_tokens=2).usage.completion_tokens == 2


def test_a_stop_string_ends_the_output_before_it_and_frees_the_sequence(server, client, expected):
    prompt = PROMPTS[2]
    full = server.tokenizer.decode(expected[prompt], skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=DECODE.max_new_tokens,
                                                    temperature=0, stop=[stop, "\x00never"], stream=True))
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=DECODE.max_new_tokens,
                                              temperature=0, stop=stop)
            text, reason = whole.choices[0].text, whole.choices[0].finish_reason
            assert whole.usage.completion_tokens < DECODE.max_new_tokens
        assert (text, reason) == (cut, "stop")
    deadline = time.monotonic() + 2
    while server.target.free_slot_count < server.target.n_slots and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.target.free_slot_count == server.target.n_slots  # the cancelled sequences gave their slots back


def test_models_and_health(server, client):
    assert [model.id for model in client.models.list()] == [MODEL]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert response.status == 200


# --- many clients ----------------------------------------------------------------------------------


def test_64_concurrent_streams_each_get_their_own_tokens_once(server, expected):
    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, list, list]:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=DECODE.max_new_tokens,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"return_token_ids": True})
        return prompt, [chunk async for chunk in stream], []

    async def all_of_them() -> list:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, PROMPTS[i % len(PROMPTS)]) for i in range(64)))

    results = asyncio.run(all_of_them())
    assert len(results) == 64
    ids = set()
    for prompt, chunks, _ in results:
        ids.add(chunks[0].id)
        assert {c.id for c in chunks} == {chunks[0].id}
        content = [c for c in chunks if c.choices]
        assert [t for c in content for t in c.choices[0].model_extra["token_ids"]] == expected[prompt]
        assert [c.choices[0].finish_reason for c in content[:-1]] == [None] * (len(content) - 1)
        assert content[-1].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == DECODE.max_new_tokens
    assert len(ids) == 64


def test_a_full_queue_answers_429_with_retry_after():
    decode = DecodeConfig(mode="target-only", max_new_tokens=200, max_seqs=1)
    with in_process_server(decode, HttpConfig(port=0, max_waiting=0), slots=1) as small:
        client = openai.OpenAI(base_url=small.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=200, stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=2)
        assert refused.value.response.headers["retry-after"] == "1"
        stream.close()


def test_a_client_leaving_mid_stream_frees_its_sequence_within_a_second(server, client):
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=CONTEXT - 120, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert scrape(server)["specpipe:num_requests_running"] == 1
    stream.close()
    left = time.monotonic()
    while scrape(server)["specpipe:num_requests_running"] > 0:
        assert time.monotonic() - left < 1.0, "the sequence of a client that left still runs"
        time.sleep(0.02)
    deadline = time.monotonic() + 1
    while server.target.free_slot_count < server.target.n_slots and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.target.free_slot_count == server.target.n_slots
    assert server.draft.free_slot_count == server.draft.n_slots
    assert scrape(server)["specpipe:request_success_total"] >= 1


def test_a_stalled_request_fails_alone_and_the_server_goes_on(server, client, expected, monkeypatch):
    # A scheduler bug that never sends one request's prompt to the target: once nothing else runs, the engine
    # finds nothing to send and nothing awaited. That request gets a 503 saying so; the one beside it and the
    # ones after it are served, and the log has the report naming the stuck sequence.
    scheduler = server.engine.scheduler
    poisoned = server.tokenizer(PROMPTS[5], add_special_tokens=False)["input_ids"]
    honest_chunk = scheduler._prompt_chunk
    monkeypatch.setattr(scheduler, "_prompt_chunk", lambda sequence: (
        10**9 if sequence.prompt == poisoned else honest_chunk(sequence)))
    failures_before = len(server.engine.engine.failures)
    outcomes: dict[str, object] = {}

    def ask(name: str, prompt: str) -> None:
        try:
            outcomes[name] = client.completions.create(model=MODEL, prompt=prompt, max_tokens=DECODE.max_new_tokens,
                                                       temperature=0, extra_body={"return_token_ids": True})
        except openai.APIStatusError as error:
            outcomes[name] = error

    threads = [threading.Thread(target=ask, args=args) for args in (("stuck", PROMPTS[5]), ("beside", PROMPTS[1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    stuck, beside = outcomes["stuck"], outcomes["beside"]
    assert isinstance(stuck, openai.APIStatusError) and stuck.status_code == 503
    assert "stalled" in stuck.message
    assert beside.choices[0].model_extra["token_ids"] == expected[PROMPTS[1]]
    (report,) = list(server.engine.engine.failures)[failures_before:]
    assert "sequence" in report and "ready" in report and "last replies" in report
    after = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=DECODE.max_new_tokens,
                                      temperature=0, extra_body={"return_token_ids": True})
    assert after.choices[0].model_extra["token_ids"] == expected[PROMPTS[2]]
    assert server.engine.alive
    deadline = time.monotonic() + 2
    while server.target.free_slot_count < server.target.n_slots and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.target.free_slot_count == server.target.n_slots


# --- what /metrics tells -----------------------------------------------------------------------------


def test_metrics_count_tokens_and_speculation(server, client):
    before = scrape(server)
    usage = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0).usage
             for p in PROMPTS[:3]]
    after = scrape(server)
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    assert delta["specpipe:generation_tokens_total"] == sum(u.completion_tokens for u in usage)
    assert delta["specpipe:prompt_tokens_total"] == sum(u.prompt_tokens for u in usage)
    assert delta["specpipe:time_to_first_token_seconds_count"] == 3
    assert delta["specpipe:e2e_request_latency_seconds_count"] == 3
    drafts, accepted = delta["specpipe:spec_decode_num_drafts_total"], delta["specpipe:spec_decode_num_accepted_tokens_total"]
    assert drafts > 0 and 0 < accepted <= delta["specpipe:spec_decode_num_draft_tokens_total"]
    assert delta["specpipe:spec_decode_num_emitted_tokens_total"] == accepted + drafts
    assert delta["specpipe:spec_decode_num_accepted_tokens_per_pos_total"] == accepted
    # every token after the prefill's first came from a verification (overlap, one token of the target per window)
    assert accepted + drafts <= delta["specpipe:generation_tokens_total"]
    assert after["specpipe:spec_decode_draft_too_slow"] == 0  # an idle machine's draft keeps up


# --- bad requests ------------------------------------------------------------------------------------

LONG = "x " * (CONTEXT * 2)
BAD_REQUESTS = {
    "empty body": (b"", 400),
    "not JSON": (b"{'model': ", 400),
    "a JSON array": (b"[1, 2]", 400),
    "no model": ({"prompt": "hi"}, 400),
    "no prompt": ({"model": MODEL}, 400),
    "empty prompt": ({"model": MODEL, "prompt": ""}, 400),
    "prompt of the wrong type": ({"model": MODEL, "prompt": {"text": "hi"}}, 400),
    "max_tokens a string": ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400),
    "max_tokens 0": ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400),
    "negative temperature": ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400),
    "top_p above 1": ({"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400),
    "top_k beyond the vocabulary": ({"model": MODEL, "prompt": "hi", "top_k": 10**7}, 400),
    "negative seed": ({"model": MODEL, "prompt": "hi", "seed": -1}, 400),
    "n above 1": ({"model": MODEL, "prompt": "hi", "n": 2}, 400),
    "two prompts": ({"model": MODEL, "prompt": ["a", "b"]}, 400),
    "a token id outside the vocabulary": ({"model": MODEL, "prompt": [1, 10**9]}, 400),
    "a prompt longer than the context": ({"model": MODEL, "prompt": LONG}, 400),
    "prompt plus max_tokens over the context": ({"model": MODEL, "prompt": "hi", "max_tokens": CONTEXT}, 400),
    "logprobs": ({"model": MODEL, "prompt": "hi", "logprobs": 3}, 400),
    "top_logprobs": ({"model": MODEL, "prompt": "hi", "top_logprobs": 2}, 400),
    "too many stop strings": ({"model": MODEL, "prompt": "hi", "stop": ["a"] * 100}, 400),
    "an unknown model": ({"model": "gpt-4", "prompt": "hi"}, 404),
    "a 10 MB body": (b'{"model": "target", "prompt": "' + b"x" * (10 << 20) + b'"}', 413),
}
BAD_CHATS = {
    "no messages": ({"model": MODEL, "messages": []}, 400),
    "a message of an unknown role": ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400),
    "messages not a list": ({"model": MODEL, "messages": "hi"}, 400),
    "response_format": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                         "response_format": {"type": "json_object"}}, 400),
    "tools": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400),
    "tool_choice": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400),
}


def test_bad_requests_get_their_4xx_while_a_healthy_stream_finishes(server, client, expected):
    healthy: list = []
    prompt = PROMPTS[4]

    def stream_one() -> None:
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=DECODE.max_new_tokens,
                                           temperature=0, stream=True, extra_body={"return_token_ids": True})
        healthy.extend(chunks)

    thread = threading.Thread(target=stream_one)
    thread.start()
    for endpoint, table in (("/v1/completions", BAD_REQUESTS), ("/v1/chat/completions", BAD_CHATS)):
        for case, (body, status) in table.items():
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            got, answer, _ = post(server.url + endpoint, raw)
            assert got == status, (case, answer)
            error = answer["error"]
            assert isinstance(error["message"], str) and error["message"], case
            assert "Traceback" not in error["message"] and len(error["message"]) < 2000, case
    thread.join(60)
    assert [t for c in healthy for t in c.choices[0].model_extra["token_ids"]] == expected[prompt]
    assert healthy[-1].choices[0].finish_reason == "length"
    assert client.completions.create(model=MODEL, prompt="def f():", max_tokens=2).usage.completion_tokens == 2


def test_fields_that_change_the_output_s_form_are_refused_by_name_not_ignored(server, client):
    messages = [{"role": "user", "content": "def f():"}]
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])
    # their neutral values are taken: free text is what they ask for
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                            response_format={"type": "text"}, tool_choice="none")
    assert answer.choices[0].message.content is not None


def test_the_api_key_is_required_when_set():
    with in_process_server(DecodeConfig(mode="target-only", max_new_tokens=2),
                           HttpConfig(port=0, api_key="s3cret")) as guarded:
        for key in ("wrong", ""):
            client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=key or "x", max_retries=0)
            if not key:
                client = client.with_options(default_headers={"Authorization": ""})
            with pytest.raises(openai.AuthenticationError, match="API key"):
                client.completions.create(model=MODEL, prompt="hi")
        good = openai.OpenAI(base_url=guarded.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi").usage.completion_tokens == 2
        with urllib.request.urlopen(guarded.url + "/health", timeout=10) as response:
            assert response.status == 200  # probes need no key


def test_two_identical_seeded_requests_return_the_same_text_whatever_else_runs(server, client):
    ask = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 1.0, "seed": 1234,
           "extra_body": {"return_token_ids": True}}
    alone = client.completions.create(**ask).choices[0]
    with ThreadPoolExecutor(4) as pool:  # the second time beside three other streams: other batches, other windows
        others = [pool.submit(client.completions.create, model=MODEL, prompt=prompt, max_tokens=24, temperature=1.0)
                  for prompt in PROMPTS[1:4]]
        again = pool.submit(client.completions.create, **ask).result().choices[0]
        [other.result() for other in others]
    assert again.text == alone.text and again.model_extra["token_ids"] == alone.model_extra["token_ids"]
    unseeded = {key: value for key, value in ask.items() if key != "seed"}
    texts = {client.completions.create(**unseeded).choices[0].text for _ in range(3)}
    assert len(texts) > 1  # without a seed, each request draws afresh
    other_seed = client.completions.create(**{**ask, "seed": 4321}).choices[0]
    assert other_seed.model_extra["token_ids"] != alone.model_extra["token_ids"]
