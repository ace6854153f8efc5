"""One request's life between the HTTP layer and the engine: its prompt and limits checked, its tokens
turned into text as they come, its stop strings honoured, its sequence cancelled if it ends early."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.algorithm.generation import ModelLimits
from pipeline.config import DecodeConfig
from pipeline.prompts import encode_prompt
from pipeline.serving.detokenizer import IncrementalDetokenizer, StopChecker
from pipeline.serving.engine_loop import EngineLoop, Finished, RequestStream
from pipeline.serving.metrics import ServingMetrics
from pipeline.serving.openai_schema import ChatCompletionRequest, CompletionRequest, SamplingFields
from workers.sampling import SamplingParams

FINISH_REASONS = {"eos": "stop", "length": "length"}  # the engine's -> OpenAI's


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters of text one token stands for, at most: its vocabulary's longest entry, counted in
    the vocabulary's own spelling (a byte-level "Ġthe" for " the", SentencePiece's "<0x0A>" for a newline),
    which is never shorter. Holds for tokenizers that keep every character (Llama, Mistral, Qwen, GPT-2)."""
    return max(map(len, tokenizer.get_vocab()), default=1) or 1


class RequestRejected(ValueError):
    """A request that cannot be served as asked: a 4xx with this message."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class GenerationFailed(RuntimeError):
    """The engine could not finish a request it had taken (a worker died, or the server stopped)."""


@dataclass(frozen=True)
class Piece:
    """What one engine step added to a request's output."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" or "length" on the last piece
    prompt_tokens: int
    completion_tokens: int  # so far


@dataclass(frozen=True)
class Prepared:
    """A request ready for the engine."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...]


class Requests:
    """Turns checked request bodies into engine sequences and their output into Pieces."""

    def __init__(self, engine: EngineLoop, tokenizer: Any, limits: ModelLimits, decode: DecodeConfig,
                 metrics: ServingMetrics, target_dir: str) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.decode = decode  # max_new_tokens and sampling: the defaults of what a request leaves out
        self.metrics = metrics
        self.target_dir = target_dir
        self.longest_token = longest_token_chars(tokenizer)
        # templates and tokenization run here, never on the event loop that streams every response; one
        # thread, since a fast tokenizer may refuse to be used by two at once
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    # --- checking ---------------------------------------------------------------------------------

    async def prepare(self, body: CompletionRequest | ChatCompletionRequest) -> Prepared:
        """The request checked and tokenized, on the tokenizing thread."""
        prepare = self.prepare_chat if isinstance(body, ChatCompletionRequest) else self.prepare_completion
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, prepare, body)

    def prepare_completion(self, body: CompletionRequest) -> Prepared:
        prompt = body.prompt
        if isinstance(prompt, str):
            self._bound(prompt, "prompt")
            ids = encode_prompt(self.tokenizer, prompt)
        else:
            ids = list(prompt)
            too_big = [token for token in ids if token >= self.limits.vocab_size]
            if too_big:
                raise RequestRejected(f"prompt token id {too_big[0]} is outside the vocabulary of "
                                      f"{self.limits.vocab_size} tokens", param="prompt")
        return self._prepare(ids, body, "prompt")

    def prepare_chat(self, body: ChatCompletionRequest) -> Prepared:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestRejected(f"the target checkpoint {self.target_dir} has no chat template (chat_template in "
                                  "its tokenizer_config.json), so /v1/chat/completions cannot render messages; use "
                                  "/v1/completions, or serve a --target that has one", param="messages")
        messages = [{"role": message.role, "content": message.text} for message in body.messages]
        self._bound("".join(message["content"] for message in messages), "messages")  # before rendering it all
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception)
            raise RequestRejected(f"the chat template cannot render these messages: {error}",
                                  param="messages") from None
        self._bound(text, "messages")
        # the template wrote the special tokens it wants (a BOS among them) as text
        return self._prepare(self.tokenizer(text, add_special_tokens=False)["input_ids"], body, "messages")

    def _bound(self, text: str, field: str) -> None:
        """Refuses a text that cannot fit the context whatever it tokenizes to, without tokenizing it: no
        token covers more characters than the vocabulary's longest, so it holds at least this many."""
        least = -(-len(text) // self.longest_token)
        context = self.limits.max_context
        if least >= context:
            raise RequestRejected(f"this model's context holds {context} tokens, and the {field} alone is at least "
                                  f"{least} ({len(text)} characters); shorten it", param=field,
                                  code="context_length_exceeded")

    def _prepare(self, ids: list[int], body: SamplingFields, prompt_field: str) -> Prepared:
        context = self.limits.max_context
        if not ids:
            raise RequestRejected(f"the {prompt_field} tokenizes to nothing; give some text", param=prompt_field)
        if len(ids) >= context:
            raise RequestRejected(f"this model's context holds {context} tokens, and the {prompt_field} alone is "
                                  f"{len(ids)}; shorten it", param=prompt_field, code="context_length_exceeded")
        if body.max_tokens is None:
            max_new = min(self.decode.max_new_tokens, context - len(ids))
        elif len(ids) + body.max_tokens > context:
            raise RequestRejected(f"this model's context holds {context} tokens, and {len(ids) + body.max_tokens} "
                                  f"were asked for ({len(ids)} in the {prompt_field}, {body.max_tokens} in max_tokens); "
                                  "lower max_tokens or shorten the prompt", param="max_tokens",
                                  code="context_length_exceeded")
        else:
            max_new = body.max_tokens
        default = self.decode.sampling
        sampling = SamplingParams(
            temperature=default.temperature if body.temperature is None else body.temperature,
            top_k=default.top_k if body.top_k is None else max(body.top_k, 0),
            top_p=default.top_p if body.top_p is None else body.top_p,
            seed=default.seed if body.seed is None else body.seed,
            reproducible=body.seed is not None,  # a seed asked for is a promise: the same request, the same text
        )
        try:
            sampling.validate(self.limits.vocab_size)
        except ValueError as error:
            raise RequestRejected(str(error).replace("--top-k", "top_k").replace("--", ""), param="top_k") from None
        return Prepared(ids, max_new, sampling, body.stops)

    # --- running ----------------------------------------------------------------------------------

    async def run(self, prepared: Prepared) -> AsyncIterator[Piece]:
        """The request's output piece by piece, the last with its finish_reason. Raises EngineUnavailable
        before the first piece when the engine cannot take it, GenerationFailed when it fails midway. If the
        caller stops early (the client left), the sequence is cancelled and its KV slots freed."""
        arrived = time.perf_counter()
        stream = RequestStream(asyncio.get_running_loop())
        seq_id = self.engine.submit(prepared.prompt_ids, prepared.max_new_tokens, prepared.sampling, stream)
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stops = StopChecker(prepared.stops) if prepared.stops else None
        prompt_tokens, completion_tokens, outcome = len(prepared.prompt_ids), 0, "abort"
        decoding = True  # the engine still decodes it
        try:
            while True:
                item = await stream.get()
                if isinstance(item, Finished):
                    decoding = False
                    if item.reason not in FINISH_REASONS:
                        outcome = "error"
                        raise GenerationFailed(item.error or f"the sequence was {item.reason}: the server is "
                                               "shutting down")
                    outcome = FINISH_REASONS[item.reason]
                    text = detokenizer.push([], final=True)
                    yield Piece(stops.push(text, final=True) if stops else text, [], outcome, prompt_tokens,
                                item.completion_tokens)
                    return
                completion_tokens += len(item)
                text = detokenizer.push(item)
                if stops is None:
                    yield Piece(text, item, None, prompt_tokens, completion_tokens)
                    continue
                text = stops.push(text)
                if stops.stopped:
                    outcome = "stop"
                    yield Piece(text, item, "stop", prompt_tokens, completion_tokens)
                    return
                yield Piece(text, item, None, prompt_tokens, completion_tokens)
        finally:
            if decoding:  # the client left, or a stop string came: free its slots
                self.engine.cancel(seq_id)
            self.metrics.finished(outcome)
            self.metrics.e2e.observe(time.perf_counter() - arrived)
