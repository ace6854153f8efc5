"""The peers: Hugging Face transformers' `generate` on the same checkpoints, greedy.

`hf target-only` is the target alone; `hf assisted` is assisted generation (`assistant_model=` the
draft, transformers' default schedule for the number of assistant tokens). Both run in the bench
process on one core with one torch thread, as each of our workers does, in float32.

At concurrency c > 1, `hf target-only` decodes the round's c prompts as one batch (left-padded, with an
attention mask); each row counts only its own new tokens, up to its EOS. Batched `generate` stamps no
tokens, so a streamer notes when each step's tokens arrive: a row's i-th token came with step i, the
first step (the prefill) is its TTFT. Assisted generation takes one sequence at a time, so `hf assisted`
runs at concurrency 1 only.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.bench.records import Generation, Round


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


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one batch padded on the left, and its attention mask (0 on the padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def up_to_eos(row: list[int], eos_ids: set[int] | frozenset[int] | list[int]) -> list[int]:
    """A batch row's own new tokens: up to its first EOS, included (what follows is padding)."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    return row


class HfRunner:
    def __init__(self, target, assistant, new_tokens: int, eos_ids: frozenset[int], pad_id: int | None = None) -> None:
        self.target = target
        self.assistant = assistant  # None: the target alone
        self.new_tokens = new_tokens
        self.eos_ids = sorted(eos_ids)
        self.pad_id = self.eos_ids[0] if pad_id is None else pad_id

    def __call__(self, prompts: list[list[int]], concurrency: int = 1, indices: list[int] | None = None) -> Round:
        """One round: one prompt alone, or (hf target-only) the round's prompts as one batch."""
        indices = list(indices) if indices is not None else list(range(len(prompts)))
        if len(prompts) == 1:
            generation = self.one(prompts[0])
            return Round([generation], generation.wall_s, indices)
        if self.assistant is not None:
            raise ValueError("transformers' assisted generation takes one sequence at a time")
        generations, wall = self.batch(prompts)
        return Round(generations, wall, indices)

    @torch.inference_mode()
    def one(self, prompt: list[int]) -> Generation:
        ids = torch.tensor([prompt])
        began = time.perf_counter()
        streamer = _CommitTimes(began)
        extra = {"assistant_model": self.assistant} if self.assistant is not None else {}
        output = self.target.generate(ids, do_sample=False, max_new_tokens=self.new_tokens, streamer=streamer,
                                      eos_token_id=self.eos_ids, pad_token_id=self.pad_id, **extra)
        wall = time.perf_counter() - began
        generated = output[0, len(prompt):].tolist()
        times = [at for at, count in streamer.events[1:] for _ in range(count)]  # the first put is the prompt
        return Generation(token_ids=generated, wall_s=wall, token_times=times[: len(generated)])

    @torch.inference_mode()
    def batch(self, prompts: list[list[int]]) -> tuple[list[Generation], float]:
        ids, mask = left_padded(prompts, self.pad_id)
        began = time.perf_counter()
        streamer = _CommitTimes(began)
        output = self.target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=self.new_tokens,
                                      streamer=streamer, eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        wall = time.perf_counter() - began
        steps = [at for at, _ in streamer.events[1:]]  # one put per step, a token for every row
        eos = set(self.eos_ids)
        generations = []
        for row in output[:, ids.shape[1]:].tolist():
            tokens = up_to_eos(row, eos)
            times = steps[: len(tokens)]
            generations.append(Generation(token_ids=tokens, wall_s=times[-1] if times else wall, token_times=times))
        return generations, wall
