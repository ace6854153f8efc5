"""Model configuration, read from a Hugging Face `config.json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.errors import UnsupportedModelError

# architecture name in config.json -> model_type; all share one decoder.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        qkv_width = hd * (self.num_heads + 2 * self.num_kv_heads)
        attn = d * qkv_width + hd * self.num_heads * d
        biases = qkv_width * self.qkv_bias + d * self.o_bias + (2 * f + d) * self.mlp_bias
        per_layer = attn + 3 * d * f + 2 * d + biases
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Builds a config from a parsed Hugging Face config.json, refusing what we do not implement."""
        architectures = raw.get("architectures") or []
        architecture = architectures[0] if architectures else _architecture_for_model_type(raw.get("model_type"))
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {architecture!r} is not supported; specpipe runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints"
            )
        model_type = SUPPORTED_ARCHITECTURES[architecture]
        activation = raw.get("hidden_act", "silu")
        if activation != "silu":
            raise UnsupportedModelError(f"hidden_act {activation!r} is not supported (only 'silu')")

        num_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        max_positions = raw.get("max_position_embeddings", 2048)
        if model_type == "mistral" and raw.get("sliding_window"):
            # A context no longer than the window makes sliding-window attention plain causal attention.
            max_positions = min(max_positions, raw["sliding_window"])
        if model_type == "qwen2" and raw.get("use_sliding_window"):
            raise UnsupportedModelError("Qwen2 checkpoints with use_sliding_window=true are not supported")

        rope_theta, rope_scaling = _rope_settings(raw)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=max_positions,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            architecture=architecture,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _architecture_for_model_type(model_type: str | None) -> str:
    for architecture, known_type in SUPPORTED_ARCHITECTURES.items():
        if known_type == model_type:
            return architecture
    return f"<model_type {model_type!r}>"


def _rope_settings(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older versions `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor other than 1.0 is not supported")
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )
    return theta, scaling
