"""Clients that stall cannot wedge the server: unread streams, half-sent bodies, silent connections, too many
connections. Driven over raw sockets (what a stalling client is) and the real `openai` client."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import openai
import pytest

from pipeline.config import DecodeConfig
from pipeline.serving.config import HttpConfig
from tests.pipeline.serving.servers import MODEL, in_process_server, start_serve
from workers.bundled import TARGET_DIR

MODEL_DIR_NAME = TARGET_DIR.name  # what `specpipe serve` calls the bundled target


def connect(url: str, receive_buffer: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connect: the window
    sock.connect((host, int(port)))
    return sock


def post(sock: socket.socket, body: bytes, declared: int | None = None) -> None:
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body) if declared is None else declared).encode() + b"\r\n\r\n" + body)


def read_all(sock: socket.socket, timeout_s: float) -> bytes:
    """What the server sends until it closes the connection (or timeout_s passes)."""
    sock.settimeout(timeout_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pass
    return received


@pytest.mark.slow
def test_streams_that_are_never_read_are_ended_and_free_their_slots():
    # 1000 tokens of stream far outgrow what the socket and the server buffer for a client whose window is 4 KiB
    served = start_serve("--mode", "target-only", "--max-seqs", "2", "--max-waiting", "1", "--max-new-tokens", "1000",
                         "--client-timeout", "5")
    try:
        body = json.dumps({"model": MODEL_DIR_NAME, "prompt": "import os\n", "max_tokens": 1000, "stream": True,
                           "temperature": 1.0}).encode()
        stalled = []
        for _ in range(3):  # --max-seqs + --max-waiting: every place the server has
            stalled.append(connect(served.url, receive_buffer=4096))
            post(stalled[-1], body)
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 10
        while True:  # until every place is taken
            try:
                client.completions.create(model=MODEL_DIR_NAME, prompt="def f", max_tokens=1)
            except openai.RateLimitError:
                break
            assert time.monotonic() < deadline, "the stalled requests were not taken"

        asked = time.monotonic()
        while True:
            try:
                answer = client.completions.create(model=MODEL_DIR_NAME, prompt="def f", max_tokens=4)
                break
            except openai.RateLimitError:
                assert time.monotonic() - asked < 30, "the stalled streams still hold every place"
                time.sleep(0.2)
        waited = time.monotonic() - asked
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert waited < 10, f"a normal request waited {waited:.1f} s behind clients that read nothing"
        deadline = time.monotonic() + 15
        while sum("whose client read nothing for 5 s (--client-timeout)" in line for line in served.log) < 2:
            assert time.monotonic() < deadline, served.log  # the running two are ended, not left to the client
            served.read_log(0.5)
        ended = [sock for sock in stalled if b"data: [DONE]" not in read_all(sock, 2)]
        assert len(ended) >= 2  # cut off, their connections dropped with what was buffered
        for sock in stalled:
            sock.close()
    finally:
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(30) == 0


@pytest.mark.slow
def test_a_request_body_that_stops_arriving_gets_408():
    with in_process_server(DecodeConfig(mode="target-only", max_new_tokens=2),
                           HttpConfig(port=0, client_timeout_s=1)) as server:
        sock = connect(server.url)
        began = time.monotonic()
        post(sock, b'{"model": ', declared=1000)  # and the rest never comes
        reply = read_all(sock, 10)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"--client-timeout" in reply
        assert time.monotonic() - began < 5
        sock.close()
        assert server.state.open_requests == 0


@pytest.mark.slow
def test_connections_that_never_send_a_request_are_closed():
    with in_process_server(DecodeConfig(mode="target-only", max_new_tokens=2),
                           HttpConfig(port=0, keep_alive_timeout_s=1)) as server:
        silent, trickling = connect(server.url), connect(server.url)
        began = time.monotonic()
        trickling.sendall(b"POST /v1/comp")  # half a request line, then nothing
        assert read_all(silent, 10) == b"" and read_all(trickling, 10) == b""  # closed by the server
        assert time.monotonic() - began < 5
        silent.close()
        trickling.close()


@pytest.mark.slow
def test_connections_past_the_limit_get_503_and_the_rest_are_served():
    with in_process_server(DecodeConfig(mode="target-only", max_new_tokens=2),
                           HttpConfig(port=0, max_connections=2)) as server:
        held = [connect(server.url), connect(server.url)]
        time.sleep(0.2)  # accepted
        extra = connect(server.url)
        post(extra, json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode())
        assert read_all(extra, 10).startswith(b"HTTP/1.1 503")
        extra.close()
        for sock in held:
            sock.close()
        time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        assert client.completions.create(model=MODEL, prompt="def f", max_tokens=2).choices[0].text is not None


@pytest.mark.slow
def test_a_huge_prompt_is_refused_without_stalling_the_streams_in_flight():
    decode = DecodeConfig(mode="target-only", max_new_tokens=250)
    with in_process_server(decode, context=1024) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        arrivals: list[float] = []
        big_requests: list[tuple[float, float]] = []

        def stream() -> None:
            for _ in client.completions.create(model=MODEL, prompt="import os\n", max_tokens=250, temperature=1.0,
                                               stream=True):
                arrivals.append(time.monotonic())

        streaming = threading.Thread(target=stream)
        streaming.start()
        while len(arrivals) < 20:  # under way
            time.sleep(0.01)
        huge = "def f(x):\n    return x\n" * 36_000  # ~900 KB, inside the 1 MiB body limit
        for _ in range(2):
            began = time.monotonic()
            with pytest.raises(openai.BadRequestError) as refused:
                client.completions.create(model=MODEL, prompt=huge, max_tokens=4)
            big_requests.append((began, time.monotonic()))
            assert refused.value.code == "context_length_exceeded"
            time.sleep(0.1)
        streaming.join(60)
        during = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])
                  if any(began - 0.1 <= later <= ended + 0.5 for began, ended in big_requests)]
        assert during, "the stream ended before the huge prompts were sent"
        assert max(during) < 0.25, f"a gap of {max(during):.2f} s while a huge prompt was refused"
