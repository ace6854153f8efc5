"""The HTTP API of `specpipe serve` (FastAPI): OpenAI's completions, chat completions and models endpoints,
with /health and /metrics. Errors are OpenAI's JSON error bodies, never a stack trace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.serving.config import HttpConfig
from pipeline.serving.engine_loop import EngineUnavailable
from pipeline.serving.metrics import ServingMetrics
from pipeline.serving.openai_schema import ChatCompletionRequest, CompletionRequest, SamplingFields
from pipeline.serving.requests import GenerationFailed, Piece, Prepared, RequestRejected, Requests

RETRY_AFTER_S = 1
DRAIN_LIMIT_BYTES = 64 << 20  # an oversized body is read (and dropped) this far, so the client sees the 413
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable"}


@dataclass
class ServerState:
    """What the routes share: set up by `specpipe serve` (or a test) before the app serves."""

    requests: Requests
    http: HttpConfig
    model_name: str
    capacity: int  # requests taken at once (running + waiting) before 429
    metrics: ServingMetrics
    draining: bool = False  # SIGTERM came: finish what runs, take nothing new
    open_requests: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def unavailable(self) -> str | None:
        """Why no request can be taken now, if so."""
        if self.requests.engine.failure is not None:
            return f"the engine stopped: {self.requests.engine.failure}"
        if self.draining:
            return "the server is shutting down"
        return None


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code if code is not None else status}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the server's limit of {limit} bytes")


class BodyLimits:
    """Refuses bodies over `limit` bytes with 413, whether or not they declare a Content-Length, and bodies
    that stop arriving for `timeout_s` with 408. An oversized body is read to its end (up to
    DRAIN_LIMIT_BYTES) first, so the client is not cut off mid-send. Waiting for the disconnect of a client
    whose body has arrived is never timed. (Inside the app's other middleware: an HTTPException raised
    here reaches the route's error handling as itself.)"""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float) -> None:
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0
        body_pending = True

        async def timed() -> Message:
            try:
                return await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise HTTPException(408, f"the request body stopped arriving for {self.timeout_s:g} s "
                                    "(--client-timeout)", headers={"Connection": "close"}) from None

        async def limited() -> Message:
            nonlocal received, body_pending
            if not body_pending:
                return await receive()
            message = await timed()
            body_pending = message["type"] == "http.request" and message.get("more_body", False)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    while message.get("more_body") and received < DRAIN_LIMIT_BYTES:
                        message = await timed()
                        received += len(message.get("body", b""))
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


ABORT_CONNECTION = "specpipe.abort_connection"  # in an HTTP scope: drops its connection, buffered bytes and all


class ClientTimedOut(Exception):
    """The client left a response unread for --client-timeout seconds."""


class UnreadResponses:
    """Abandons a response the client stops reading for `timeout_s` (uvicorn's send waits while the socket's
    buffers are full), which cancels its sequence, and drops its connection: closing it would wait for the
    client to read what is buffered."""

    def __init__(self, app: ASGIApp, timeout_s: float, log: Callable[[str], None]) -> None:
        self.app, self.timeout_s, self.log = app, timeout_s, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def timed_send(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), self.timeout_s)
            except TimeoutError:
                raise ClientTimedOut from None

        try:
            await self.app(scope, receive, timed_send)
        except ClientTimedOut:
            abort = scope.get(ABORT_CONNECTION)  # set by pipeline.serving.connections; else uvicorn closes it
            if abort is not None:
                abort()
            self.log(f"ended a response to {scope['path']} whose client read nothing for {self.timeout_s:g} s "
                     "(--client-timeout)")


class EventStream(StreamingResponse):
    """Server-sent events that stop the moment the client leaves (even while no event is due), and always
    close their source, so that its `finally` cancels the sequence."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def left() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            await first_of(self.stream_response(send), left())
        except OSError:  # the client left mid-write
            pass
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def first_of(work: Awaitable[None], stopper: Awaitable[None]) -> bool:
    """Runs `work` until it ends or `stopper` does (then `work` is cancelled); True if `work` ran to its end.
    Raises what `work` raised."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(stopper)
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        return False
    task.result()
    return True


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (its request body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class ClientLeft(Exception):
    """The client disconnected before its response began."""


async def prepend(first: Piece, rest: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    yield first
    if first.finish_reason is None:
        async for piece in rest:
            yield piece


def build_app(state: ServerState, log: Callable[[str], None] = lambda line: None) -> FastAPI:
    app = FastAPI(title="specpipe", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimits, limit=state.http.max_body_bytes, timeout_s=state.http.client_timeout_s)
    app.state.server = state

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {errors[0].get('ctx', {}).get('error')}")
        problems, fields = [], []
        for problem in errors[:5]:  # never the input: it may be megabytes
            fields.append(".".join(str(part) for part in problem.get("loc", ())[1:]))
            problems.append(f"{fields[-1] or 'body'}: {problem.get('msg', 'invalid')}")
        return error_response(400, "; ".join(problems) or "the request body is not valid", fields[0] if fields else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, error: RequestRejected) -> JSONResponse:
        return error_response(error.status, str(error), error.param, error.code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:
        traceback.print_exc(file=sys.stderr)  # for the operator; the client gets one line
        return error_response(500, f"internal error: {type(error).__name__}")

    @app.middleware("http")
    async def authorize(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        key = state.http.api_key
        if key and request.url.path.startswith("/v1/"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
                return error_response(401, "missing or wrong API key: send the header Authorization: Bearer KEY "
                                      "with the server's --api-key", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        why = state.unavailable
        return JSONResponse({"status": "ok"}) if why is None else error_response(503, why)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "specpipe",
            "max_model_len": state.requests.limits.max_context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prepared = await admit(body)
        return await respond(request, body, prepared, CompletionFormat(state.model_name, body.return_token_ids))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        prepared = await admit(body)
        return await respond(request, body, prepared, ChatFormat(state.model_name, body.return_token_ids))

    async def admit(body: CompletionRequest | ChatCompletionRequest) -> Prepared:
        if body.model != state.model_name:
            raise RequestRejected(f"the model {body.model!r} does not exist; this server serves "
                                  f"{state.model_name!r} (GET /v1/models)", 404, "model", "model_not_found")
        why = state.unavailable
        if why is not None:
            raise RequestRejected(why, 503)
        if state.open_requests >= state.capacity:
            raise HTTPException(429, f"{state.open_requests} requests are running or waiting, the most this server "
                                "queues (--max-seqs plus --max-waiting); retry later",
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        state.open_requests += 1  # its place, held from here: other requests arrive while this one tokenizes
        try:
            return await state.requests.prepare(body)  # off the event loop
        except BaseException:
            state.open_requests -= 1
            raise

    async def respond(request: Request, body: SamplingFields, prepared: Prepared, form: "Format") -> Response:
        """Runs an admitted request; its place (open_requests) is given back when it ends, however it ends."""
        pieces = state.requests.run(prepared)
        taken: list[Piece] = []

        async def take_first() -> None:  # the engine takes it, or says why not, before any byte is sent
            taken.append(await anext(pieces))

        try:
            if not await first_of(take_first(), disconnected(request)):
                raise ClientLeft
        except (EngineUnavailable, GenerationFailed, ClientLeft) as error:
            state.open_requests -= 1
            await pieces.aclose()  # type: ignore[attr-defined]
            return Response(status_code=499) if isinstance(error, ClientLeft) else error_response(503, str(error))
        except BaseException:
            state.open_requests -= 1
            await pieces.aclose()  # type: ignore[attr-defined]
            raise
        if body.stream:
            return EventStream(events(taken[0], pieces, form, body.include_usage), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
        return await whole(request, taken[0], pieces, form)

    async def events(first: Piece, pieces: AsyncIterator[Piece], form: "Format", usage: bool) -> AsyncIterator[str]:
        try:
            header = form.header(usage)
            if header:
                yield header
            last = first
            async for piece in prepend(first, pieces):
                last = piece
                if piece.text or piece.finish_reason or form.ids:
                    yield sse(form.chunk(piece, usage))
            if usage:
                yield sse(form.usage_chunk(last))
        except GenerationFailed as error:
            yield sse(error_body(503, str(error)))
        finally:
            state.open_requests -= 1
            await pieces.aclose()  # type: ignore[attr-defined]
        yield "data: [DONE]\n\n"

    async def whole(request: Request, first: Piece, pieces: AsyncIterator[Piece], form: "Format") -> Response:
        collected: list[Piece] = []

        async def collect() -> None:
            async for piece in prepend(first, pieces):
                collected.append(piece)

        try:
            if not await first_of(collect(), disconnected(request)):
                return Response(status_code=499)  # nobody reads it (nginx's code for a client that left)
        except GenerationFailed as error:
            return error_response(503, str(error))
        finally:
            state.open_requests -= 1
            await pieces.aclose()  # type: ignore[attr-defined]
        return JSONResponse(form.whole(collected))

    app.add_middleware(UnreadResponses, timeout_s=state.http.client_timeout_s, log=log)  # the outermost
    return app


class Format:
    """How one endpoint writes its responses and stream chunks."""

    object_name = ""
    chunk_name = ""

    def __init__(self, model: str, ids: bool) -> None:
        self.model, self.ids = model, ids  # ids: the return_token_ids extension
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    prefix = "cmpl"

    def envelope(self, name: str) -> dict[str, Any]:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model}

    def header(self, usage: bool) -> str:
        return ""

    def usage(self, piece: Piece) -> dict[str, int]:
        return {"prompt_tokens": piece.prompt_tokens, "completion_tokens": piece.completion_tokens,
                "total_tokens": piece.prompt_tokens + piece.completion_tokens}

    def usage_chunk(self, last: Piece) -> dict[str, Any]:
        return {**self.envelope(self.chunk_name), "choices": [], "usage": self.usage(last)}

    def with_ids(self, choice: dict[str, Any], token_ids: list[int]) -> dict[str, Any]:
        if self.ids:
            choice["token_ids"] = token_ids
        return choice

    def chunk(self, piece: Piece, usage: bool) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, pieces: list[Piece]) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(Format):
    object_name = chunk_name = "text_completion"

    def chunk(self, piece: Piece, usage: bool) -> dict[str, Any]:
        choice = {"index": 0, "text": piece.text, "logprobs": None, "finish_reason": piece.finish_reason}
        body = {**self.envelope(self.chunk_name), "choices": [self.with_ids(choice, piece.token_ids)]}
        return {**body, "usage": None} if usage else body

    def whole(self, pieces: list[Piece]) -> dict[str, Any]:
        last = pieces[-1]
        choice = {"index": 0, "text": "".join(p.text for p in pieces), "logprobs": None,
                  "finish_reason": last.finish_reason}
        return {**self.envelope(self.object_name),
                "choices": [self.with_ids(choice, [t for p in pieces for t in p.token_ids])],
                "usage": self.usage(last)}


class ChatFormat(Format):
    object_name, chunk_name, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def header(self, usage: bool) -> str:
        """The first chunk names the speaker, as OpenAI's does."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        body = {**self.envelope(self.chunk_name), "choices": [choice]}
        return sse({**body, "usage": None} if usage else body)

    def chunk(self, piece: Piece, usage: bool) -> dict[str, Any]:
        delta = {"content": piece.text} if piece.text or not piece.finish_reason else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": piece.finish_reason}
        body = {**self.envelope(self.chunk_name), "choices": [self.with_ids(choice, piece.token_ids)]}
        return {**body, "usage": None} if usage else body

    def whole(self, pieces: list[Piece]) -> dict[str, Any]:
        last = pieces[-1]
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(p.text for p in pieces)},
                  "logprobs": None, "finish_reason": last.finish_reason}
        return {**self.envelope(self.object_name),
                "choices": [self.with_ids(choice, [t for p in pieces for t in p.token_ids])],
                "usage": self.usage(last)}
