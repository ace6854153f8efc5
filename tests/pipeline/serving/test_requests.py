"""How a request's prompt becomes tokens: as transformers makes them by default, and never at any cost."""

from __future__ import annotations

import pytest
from tokenizers.processors import TemplateProcessing

from pipeline.algorithm.generation import ModelLimits
from pipeline.config import DecodeConfig
from pipeline.prompts import encode_prompt
from pipeline.serving.metrics import ServingMetrics
from pipeline.serving.openai_schema import ChatCompletionRequest, CompletionRequest
from pipeline.serving.requests import RequestRejected, Requests, longest_token_chars
from tests.pipeline.serving.servers import CHAT_TEMPLATE
from workers.bundled import TARGET_DIR
from workers.model.checkpoint import load_tokenizer

BOS = "<|endoftext|>"  # the bundled tokenizer's one special token, made a BOS here as Llama's is


@pytest.fixture(scope="module")
def llama_like_tokenizer():
    """The bundled tokenizer, adding a BOS to every text as Llama's tokenizers do."""
    tokenizer = load_tokenizer(TARGET_DIR)
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    tokenizer.bos_token = BOS
    return tokenizer


class CountingTokenizer:
    """A tokenizer that counts how often it is asked to tokenize."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def requests_for(tokenizer, context: int = 1024) -> Requests:
    limits = ModelLimits(tokenizer.vocab_size, frozenset({0}), context)
    return Requests(None, tokenizer, limits, DecodeConfig(), ServingMetrics("m", 3), str(TARGET_DIR))


def test_a_completion_prompt_carries_the_tokenizers_special_tokens_as_every_command_does(llama_like_tokenizer):
    prepared = requests_for(llama_like_tokenizer).prepare_completion(CompletionRequest(model="m", prompt="def f():"))
    bos_id = llama_like_tokenizer.convert_tokens_to_ids(BOS)
    assert prepared.prompt_ids[0] == bos_id and prepared.prompt_ids[1:] == llama_like_tokenizer(
        "def f():", add_special_tokens=False)["input_ids"]
    assert prepared.prompt_ids == encode_prompt(llama_like_tokenizer, "def f():")  # launch, bench, profile's


def test_a_chat_prompt_has_the_templates_bos_once(llama_like_tokenizer):
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    ids = requests_for(llama_like_tokenizer).prepare_chat(body).prompt_ids
    bos_id = llama_like_tokenizer.convert_tokens_to_ids(BOS)
    assert ids[0] == bos_id and ids.count(bos_id) == 1


def test_a_prompt_that_cannot_fit_the_context_is_refused_without_being_tokenized():
    tokenizer = CountingTokenizer(load_tokenizer(TARGET_DIR))
    tokenizer.inner.chat_template = CHAT_TEMPLATE
    requests = requests_for(tokenizer, context=1024)
    longest = longest_token_chars(tokenizer)
    for body in (CompletionRequest(model="m", prompt="x" * (1024 * longest)),
                 ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x" * (1024 * longest)}])):
        prepare = requests.prepare_chat if isinstance(body, ChatCompletionRequest) else requests.prepare_completion
        with pytest.raises(RequestRejected, match="context holds 1024 tokens") as refused:
            prepare(body)
        assert refused.value.code == "context_length_exceeded"
    assert tokenizer.calls == 0
    # one token short of what the bound can rule out: tokenized, then judged by its real length
    assert len(requests.prepare_completion(CompletionRequest(model="m", prompt="x" * 1000)).prompt_ids) < 1024
    assert tokenizer.calls == 1
