"""Small random Hugging Face checkpoints written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, vocab_size=128, max_position_embeddings=256,
              initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=1)

CHECKPOINTS = {
    # GQA (4 query heads share 2 KV heads), Llama-3 rope scaling, untied embeddings
    "llama3-gqa": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False)),
}


def write_checkpoint(name: str, directory: Path, seed: int = 0, **save_kwargs) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = CHECKPOINTS[name]().eval()
    model.save_pretrained(directory, **save_kwargs)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name -> (directory, the transformers model it was saved from)."""
    out = {}
    for index, name in enumerate(CHECKPOINTS):
        directory = tmp_path_factory.mktemp(name)
        out[name] = (directory, write_checkpoint(name, directory, seed=index))
    return out
