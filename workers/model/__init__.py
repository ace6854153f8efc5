"""A compact Llama-family decoder with a static KV cache (see llama.py) and its runner."""

from workers.model.config import ModelConfig, RopeScaling
from workers.model.torch_runner import ModelRunner

__all__ = ["ModelConfig", "RopeScaling", "ModelRunner"]
