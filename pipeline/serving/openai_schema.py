"""The OpenAI request bodies `specpipe serve` takes, as pydantic models: types and ranges checked on receipt.

Fields OpenAI defines and specpipe does not implement are refused with a 400 when set to anything but
their neutral value, rather than ignored; fields unknown to OpenAI are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.sampling import MAX_SEED, MIN_TEMPERATURE

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256

TokenIds = list[Annotated[int, Field(ge=0)]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat share: how much to generate, how to sample it, where to stop."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None = the server's --max-new-tokens (to the context)
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # an extension (vLLM's): 0 or -1 = off
    seed: Annotated[int, Field(ge=0, lt=MAX_SEED)] | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]],
                          Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    return_token_ids: bool = False  # an extension: each choice carries the token ids it holds
    # OpenAI's, not implemented: refused unless neutral
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    # fields that would change the output's form (structured output, tool calls): refused, never ignored, since a
    # client that set them would take free text for their answer
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None

    @model_validator(mode="after")
    def _refuse_unimplemented(self) -> "SamplingFields":
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format is not supported by specpipe (no constrained decoding: the output is "
                             "free text); leave it out or set {\"type\": \"text\"}")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise ValueError(f"{name} are not supported by specpipe (no tool calls: the output is free text); "
                                 "leave them out")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise ValueError(f"{name} is not supported by specpipe (no tool calls); leave it out or set \"none\"")
        if self.top_logprobs:
            raise ValueError("top_logprobs are not supported by specpipe; leave them out")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by specpipe (its output follows the target's "
                                 "distribution exactly); leave it out or set 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by specpipe; leave it out")
        if self.logprobs:
            raise ValueError("logprobs are not supported by specpipe; leave them out")
        if self.temperature is not None and 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        if isinstance(self.stop, str) and not 0 < len(self.stop) <= MAX_STOP_LENGTH:
            raise ValueError(f"stop strings must hold 1 to {MAX_STOP_LENGTH} characters")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """POST /v1/completions. One prompt per request: text, or token ids (a list of one of either is taken too)."""

    prompt: str | TokenIds | list[str] | list[TokenIds]
    echo: bool = False
    best_of: Literal[1] | None = None
    suffix: None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported by specpipe; leave it out")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"specpipe takes one prompt per request, got {len(prompt)}; send one request each")
            self.prompt = prompt[0]
        if not self.prompt:
            raise ValueError("prompt is empty; give some text or token ids")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions: the messages rendered with the target tokenizer's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens

    @model_validator(mode="after")
    def _one_limit(self) -> "ChatCompletionRequest":
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self
