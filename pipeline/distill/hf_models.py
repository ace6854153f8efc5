"""The draft as a transformers model: shaped from the target's config, saved as an ordinary checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.distill.config import DraftShape


def load_target(directory: Path, device: torch.device, dtype: torch.dtype):
    """The target as a transformers causal LM, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def end_of_text_id(config) -> int | None:
    """The model's end-of-text token (the first, where config.json lists several)."""
    eos = config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def draft_config(target_config, shape: DraftShape):
    """A Llama config of `shape` that shares everything tokens and positions depend on with the target:
    vocabulary, special tokens, context length and rotary embedding."""
    from transformers import LlamaConfig

    rope = dict(getattr(target_config, "rope_parameters", None) or {})
    rope = rope or {"rope_type": "default", "rope_theta": float(getattr(target_config, "rope_theta", 10000.0))}
    return LlamaConfig(
        vocab_size=target_config.vocab_size,
        hidden_size=shape.width,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.width // shape.heads,
        intermediate_size=shape.ffn,
        max_position_embeddings=target_config.max_position_embeddings,
        rope_parameters=rope,
        rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-5),
        tie_word_embeddings=True,  # a small draft's embedding is most of its weights: share it with the head
        bos_token_id=target_config.bos_token_id,
        eos_token_id=target_config.eos_token_id,
        pad_token_id=getattr(target_config, "pad_token_id", None),
        initializer_range=0.02,
    )


def new_draft(target_config, shape: DraftShape, init_dir: Path | None, seed: int):
    """A draft of `shape` with random weights, or the draft at `init_dir` (--init). A --layers beyond the
    init draft's own appends layers that start as the identity, so training starts from its predictions."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if init_dir is None:
        return LlamaForCausalLM(draft_config(target_config, shape))
    draft = LlamaForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    if draft.config.vocab_size != target_config.vocab_size:
        raise ValueError(f"--init {init_dir} has a vocabulary of {draft.config.vocab_size} tokens and the "
                         f"target {target_config.vocab_size}; a draft must share the target's tokenizer")
    if shape.layers > draft.config.num_hidden_layers:
        grow(draft, shape.layers)
    return draft


def grow(draft, layers: int) -> None:
    """Appends decoder layers whose output projections are zero: each adds nothing to the residual stream
    until training moves them (block expansion, as in LLaMA Pro), so the draft's outputs are unchanged."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = draft.config
    for index in range(config.num_hidden_layers, layers):
        layer = LlamaDecoderLayer(config, layer_idx=index)
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=config.initializer_range)
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
        draft.model.layers.append(layer)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * layers


def shape_of(draft) -> DraftShape:
    return DraftShape(layers=draft.config.num_hidden_layers, width=draft.config.hidden_size)


def save_draft(draft, target_dir: Path, out_dir: Path, card: dict) -> None:
    """An ordinary Hugging Face checkpoint (bf16 safetensors) with the target's tokenizer and a training.json;
    `draft` is left in bf16."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    draft.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(target_dir).save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(card, indent=2) + "\n")
