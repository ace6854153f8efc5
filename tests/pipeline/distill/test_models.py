"""The draft as distill makes it: the target's vocabulary, context and rotary embedding; grown without a jolt."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.distill.config import DraftShape
from pipeline.distill.hf_models import draft_config, new_draft


def target_config(**changes) -> LlamaConfig:
    settings = dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, bos_token_id=5,
                    eos_token_id=7, pad_token_id=7, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    return LlamaConfig(**{**settings, **changes})


def test_the_draft_shares_what_tokens_and_positions_depend_on():
    config = draft_config(target_config(), DraftShape(layers=1, width=64))
    assert (config.vocab_size, config.max_position_embeddings, config.bos_token_id, config.eos_token_id) == (300, 512, 5, 7)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.head_dim) == (1, 64, 1, 64)
    assert config.tie_word_embeddings


def test_layers_beyond_the_init_drafts_start_as_the_identity(tmp_path):
    torch.manual_seed(0)
    small = LlamaForCausalLM(draft_config(target_config(), DraftShape(layers=1, width=64))).eval()
    small.save_pretrained(tmp_path)
    grown = new_draft(target_config(), DraftShape(layers=3, width=64), tmp_path, seed=1).eval()
    assert len(grown.model.layers) == grown.config.num_hidden_layers == 3
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(grown(tokens).logits, small(tokens).logits, atol=1e-6)
    # the new layers are not dead: their inner projections are random, only the outputs start at zero
    assert grown.model.layers[2].self_attn.q_proj.weight.abs().sum() > 0
    assert grown.model.layers[2].mlp.down_proj.weight.abs().sum() == 0


def test_an_init_draft_with_another_vocabulary_is_refused(tmp_path):
    LlamaForCausalLM(draft_config(target_config(vocab_size=200), DraftShape(1, 64))).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--init"):
        new_draft(target_config(), DraftShape(1, 64), tmp_path, seed=0)
