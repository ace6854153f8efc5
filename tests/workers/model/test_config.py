"""config.json is read the same way whichever transformers version wrote it."""

import pytest

from workers.errors import UnsupportedModelError
from workers.model.config import ModelConfig

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_old_and_new_rope_formats_agree():
    new = ModelConfig.from_hf({**BASE, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    old = ModelConfig.from_hf({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3})
    assert new == old
    assert new.rope_theta == 500000.0 and new.rope_scaling.rope_type == "llama3"


def test_head_dim_explicit_or_derived():
    assert ModelConfig.from_hf(BASE).head_dim == 16
    assert ModelConfig.from_hf({**BASE, "head_dim": 32}).head_dim == 32


def test_eos_as_int_or_list():
    assert ModelConfig.from_hf({**BASE, "eos_token_id": 2}).eos_token_ids == (2,)
    assert ModelConfig.from_hf({**BASE, "eos_token_id": [2, 7]}).eos_token_ids == (2, 7)


def test_mistral_sliding_window_bounds_the_context():
    config = ModelConfig.from_hf({**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 128})
    assert config.max_position_embeddings == 128


def test_qwen2_has_qkv_bias():
    assert ModelConfig.from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"]}).qkv_bias


def test_non_silu_activation_refused():
    with pytest.raises(UnsupportedModelError, match="gelu"):
        ModelConfig.from_hf({**BASE, "hidden_act": "gelu"})


@pytest.mark.parametrize("name", ["llama3-gqa", "llama-tied", "qwen2", "mistral"])
def test_parameter_count_matches_transformers(checkpoints, name):
    directory, model = checkpoints[name]
    from workers.model.checkpoint import read_config

    assert read_config(directory).num_params == sum(p.numel() for p in model.parameters())
