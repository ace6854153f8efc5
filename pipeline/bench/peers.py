"""The peers: Hugging Face transformers' `generate` on the same checkpoints, greedy.

`hf target-only` is the target alone; `hf assisted` is assisted generation (`assistant_model=` the
draft, transformers' default schedule for the number of assistant tokens). Both run in the bench
process on one core with one torch thread, as each of our workers does, in float32.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.bench.records import Generation


class _CommitTimes:
    """A transformers streamer that notes when each batch of tokens is committed."""

    def __init__(self, began: float) -> None:
        self.began = began
        self.events: list[tuple[float, int]] = []  # (seconds since began, tokens)

    def put(self, value: torch.Tensor) -> None:
        self.events.append((time.perf_counter() - self.began, int(value.numel())))

    def end(self) -> None:
        pass


def load_models(target_dir: Path, draft_dir: Path):
    """The target and the draft as transformers models, float32, for inference."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # its load progress bars and deprecation notes would cut through ours
    logging.disable_progress_bar()
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    return target, draft


class HfRunner:
    def __init__(self, target, assistant, new_tokens: int, eos_ids: frozenset[int]) -> None:
        self.target = target
        self.assistant = assistant  # None: the target alone
        self.new_tokens = new_tokens
        self.eos_ids = sorted(eos_ids)

    @torch.inference_mode()
    def __call__(self, prompt: list[int]) -> Generation:
        ids = torch.tensor([prompt])
        began = time.perf_counter()
        streamer = _CommitTimes(began)
        extra = {"assistant_model": self.assistant} if self.assistant is not None else {}
        output = self.target.generate(ids, do_sample=False, max_new_tokens=self.new_tokens, streamer=streamer,
                                      eos_token_id=self.eos_ids, pad_token_id=self.eos_ids[0], **extra)
        wall = time.perf_counter() - began
        generated = output[0, len(prompt):].tolist()
        times = [at for at, count in streamer.events[1:] for _ in range(count)]  # the first put is the prompt
        return Generation(token_ids=generated, wall_s=wall, token_times=times[: len(generated)])
