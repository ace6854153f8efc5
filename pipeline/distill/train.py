"""The distillation loop: the draft learns the target's next-token distributions, resumably.

Each step takes windows of the corpus and of the target's own continuations, runs the frozen target
for its log-probabilities and trains the draft on forward KL(target || draft) per position, the
objective whose minimum makes the draft's greedy token the target's as often as its size allows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from pipeline.distill.config import TrainingConfig
from pipeline.distill.corpus import sample_windows
from pipeline.distill.hf_models import end_of_text_id
from workers.backends.cpu_fp16 import native_bf16_gemm

VALIDATION_WINDOWS = 16
EVAL_EVERY_S = 120.0  # validation loss and a saved state this often, and at the end


@dataclass
class Progress:
    """What a resumed run continues from (saved beside the weights and the optimizer's moments)."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0  # training time so far, across runs
    validation_kl: float | None = None


@dataclass(frozen=True)
class Streams:
    corpus: Tensor  # [N] token ids of the corpus, documents separated by the end-of-text token
    generated: Tensor  # [M] the target's continuations (prompt included), the same way
    validation: Tensor  # [V] held-back corpus documents


def mixed_precision(device: torch.device):
    """bf16 autocast where the hardware multiplies bf16 (CUDA, or a CPU with AVX512-BF16 or AMX), else none."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16_gemm())


def forward_kl(draft, target, tokens: Tensor, device: torch.device) -> Tensor:
    """Mean over positions of KL(target || draft) for windows `tokens` [B, T]."""
    with mixed_precision(device):
        with torch.no_grad():
            teacher = F.log_softmax(target(tokens).logits.float(), dim=-1)
        student = F.log_softmax(draft(tokens).logits.float(), dim=-1)
    return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


def learning_rate(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak as `progress` goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def validation_kl(draft, target, stream: Tensor, length: int, device: torch.device) -> float:
    generator = torch.Generator().manual_seed(0)  # the same windows every time
    windows = sample_windows(stream, VALIDATION_WINDOWS, length, generator).to(device)
    draft.eval()
    losses = [forward_kl(draft, target, windows[i : i + 4], device).item() for i in range(0, len(windows), 4)]
    draft.train()
    return sum(losses) / len(losses)


def distill(draft, target, streams: Streams, training: TrainingConfig, device: torch.device, state_dir: Path,
            log: Callable[[str], None]) -> Progress:
    """Trains `draft` in place until --steps or --minutes; a rerun with the same state_dir continues."""
    state_file = state_dir / "state.pt"
    optimizer = torch.optim.AdamW(draft.parameters(), lr=training.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    progress = Progress()
    if state_file.exists():
        saved = torch.load(state_file, map_location=device, weights_only=True)
        try:
            draft.load_state_dict(saved["draft"])
        except RuntimeError:
            raise ValueError(f"{state_dir} holds the state of a draft of another shape; give another --out or "
                             "the --layers and --width it was started with") from None
        optimizer.load_state_dict(saved["optimizer"])
        progress = Progress(**saved["progress"])
        log(f"resuming at step {progress.step} ({progress.seconds / 60:.1f} min trained)")

    budget_s = None if training.time_budget_minutes is None else training.time_budget_minutes * 60
    done = lambda: (training.steps is not None and progress.step >= training.steps) or (  # noqa: E731
        budget_s is not None and progress.seconds >= budget_s)
    warmup = max(1, min(100, (training.steps or 1000) // 10))
    half = max(1, training.batch_size // 2) if streams.generated.numel() else training.batch_size

    def save() -> None:
        torch.save({"draft": draft.state_dict(), "optimizer": optimizer.state_dict(), "progress": asdict(progress)},
                   state_file)

    if progress.step == 0:  # where the draft starts from, to judge the training by
        log(f"validation KL before training: {validation_kl(draft, target, streams.validation, training.seq_len, device):.4f}")
    draft.train()
    bar = tqdm(total=training.steps, initial=progress.step, desc="distill", unit="step", dynamic_ncols=True,
               leave=False)
    last_eval = time.perf_counter()
    while not done():
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(training.seed * 1_000_003 + progress.step)  # resumes repeat batches
        parts = [sample_windows(streams.corpus, half, training.seq_len, generator)]
        if half < training.batch_size:
            parts.append(sample_windows(streams.generated, training.batch_size - half, training.seq_len, generator))
        tokens = torch.cat(parts).to(device, non_blocking=True)
        fraction = max(progress.step / training.steps if training.steps else 0.0,
                       progress.seconds / budget_s if budget_s else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress.step, fraction, training.learning_rate, warmup)
        loss = forward_kl(draft, target, tokens, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        progress.step += 1
        progress.tokens += tokens.numel()
        progress.seconds += time.perf_counter() - began
        bar.update(1)
        bar.set_postfix(kl=f"{loss.item():.3f}", tok_s=f"{tokens.numel() / (time.perf_counter() - began):,.0f}",
                        min=f"{progress.seconds / 60:.1f}")
        if time.perf_counter() - last_eval > EVAL_EVERY_S or done():
            progress.validation_kl = validation_kl(draft, target, streams.validation, training.seq_len, device)
            tqdm.write(f"[distill] step {progress.step}: KL {loss.item():.4f}, validation KL "
                       f"{progress.validation_kl:.4f}, {progress.tokens:,} tokens in {progress.seconds / 60:.1f} min")
            save()
            last_eval = time.perf_counter()
    bar.close()
    if progress.validation_kl is None:
        progress.validation_kl = validation_kl(draft, target, streams.validation, training.seq_len, device)
    save()
    return progress


@torch.no_grad()
def target_continuations(target, corpus: Tensor, count: int, device: torch.device, seed: int,
                         prompt_len: int = 64, new_tokens: int = 192, batch: int = 64) -> Tensor:
    """`count` continuations the target writes after corpus windows (alternate batches greedy and sampled at
    temperature 1), prompt included, as one stream with end-of-text tokens between them."""
    generator = torch.Generator().manual_seed(seed)
    eos = end_of_text_id(target.config)
    pieces = []
    for first in tqdm(range(0, count, batch), desc="target continuations", dynamic_ncols=True, leave=False):
        prompts = sample_windows(corpus, min(batch, count - first), prompt_len, generator).to(device)
        sampled = (first // batch) % 2 == 1
        with mixed_precision(device):
            out = target.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=sampled, pad_token_id=eos,
                                  **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if sampled else {}))
        with_eos = torch.cat([out, torch.full((out.shape[0], 1), eos, device=out.device)], dim=1)
        pieces.append(with_eos.flatten().cpu().to(torch.int32))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)
