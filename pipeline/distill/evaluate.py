"""How well a draft speculates for its target, measured through specpipe's own runner.

For each prompt the target writes a greedy continuation; on those prefixes (the target's own text, as
in decoding) the draft is scored by
  - greedy agreement: how often its argmax is the target's next token;
  - greedy speculation at window k: acceptance rate (accepted / drafted) and mean acceptance length
    (accepted + the target's own token per verification). Greedy speculative decoding emits exactly the
    target's greedy tokens, so it is replayed here against the recorded continuation;
  - cost: single-token decode time of each model on one CPU thread, run as `specpipe launch` runs it there
    (`--dtype auto`: fp16 weights on specpipe's CPU kernels where they build), and their ratio.

The scores come from fp32 runners, the same on every machine; the cost from the runners a user gets.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.model import ModelRunner
from workers.model.checkpoint import load_tokenizer
from workers.worker_settings import AUTO_DTYPE, resolved_dtype

DECODE_STEPS = 48


@dataclass(frozen=True)
class WindowFigures:
    k: int
    verifications: int
    drafted: int
    accepted: int
    per_position: tuple[float, ...]  # acceptance of the i-th drafted token, given the ones before it were
    histogram: tuple[int, ...]  # verifications that accepted 0..k tokens

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return (self.accepted + self.verifications) / self.verifications if self.verifications else 0.0


@dataclass(frozen=True)
class PairReport:
    draft: str
    target: str
    draft_params: int
    target_params: int
    prompts: int
    target_tokens: int
    agreement: float
    windows: tuple[WindowFigures, ...]
    draft_decode_ms: float
    target_decode_ms: float
    cost_numerics: str = ""  # what the timed runners ran on (their startup lines, each once)
    extra: dict = field(default_factory=dict)

    @property
    def cost_ratio(self) -> float:
        """The draft's single-token decode time as a fraction of the target's."""
        return self.draft_decode_ms / self.target_decode_ms

    def lines(self) -> list[str]:
        out = [f"draft {self.draft} ({self.draft_params / 1e6:.2f}M params), target {self.target} "
               f"({self.target_params / 1e6:.2f}M params)",
               f"{self.prompts} prompts, {self.target_tokens} target tokens (greedy)",
               f"greedy agreement: {self.agreement:.1%}"]
        for w in self.windows:
            out.append(f"k={w.k}: acceptance rate {w.acceptance_rate:.1%}, mean acceptance length "
                       f"{w.mean_acceptance_length:.2f} ({w.verifications} verifications; per position "
                       f"{', '.join(f'{p:.2f}' for p in w.per_position)})")
        out.append(f"single-token decode on 1 CPU thread ({self.cost_numerics}): draft {self.draft_decode_ms:.2f} ms, "
                   f"target {self.target_decode_ms:.2f} ms (draft = 1/{1 / self.cost_ratio:.1f} of the target)")
        return out

    def to_json(self) -> dict:
        return {"draft": self.draft, "target": self.target, "draft_params": self.draft_params,
                "target_params": self.target_params, "prompts": self.prompts, "target_tokens": self.target_tokens,
                "agreement": self.agreement, "draft_decode_ms": self.draft_decode_ms,
                "target_decode_ms": self.target_decode_ms, "cost_ratio": self.cost_ratio,
                "cost_numerics": self.cost_numerics, **self.extra,
                "k": {str(w.k): {"verifications": w.verifications, "drafted": w.drafted, "accepted": w.accepted,
                                 "acceptance_rate": w.acceptance_rate,
                                 "mean_acceptance_length": w.mean_acceptance_length,
                                 "per_position_acceptance": list(w.per_position),
                                 "accepted_length_histogram": list(w.histogram)} for w in self.windows}}


def greedy_continuation(target: ModelRunner, prompt: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    target.truncate(0, 0)
    logits = target.forward(prompt, 0)
    out: list[int] = []
    while len(out) < new_tokens:
        token = int(logits[-1].argmax())
        out.append(token)
        if token in eos or len(prompt) + len(out) >= target.max_seq_len:
            break
        logits = target.forward([token], len(prompt) + len(out) - 1)
    return out


def agreement(draft: ModelRunner, prompt: list[int], continuation: list[int]) -> tuple[int, int]:
    """(matches, positions): the draft's argmax against the target's token, on the target's text."""
    draft.truncate(0, 0)
    logits = draft.forward(prompt + continuation[:-1], 0)
    predicted = logits[len(prompt) - 1 :].argmax(-1).tolist()
    return sum(p == t for p, t in zip(predicted, continuation)), len(continuation)


def speculate(draft: ModelRunner, prompt: list[int], continuation: list[int], k: int) -> list[tuple[int, int]]:
    """Greedy speculation replayed against the target's continuation: (drafted, accepted) per verification."""
    draft.truncate(0, 0)
    draft.forward(prompt[:-1], 0)
    pending = [prompt[-1]]  # tokens the target has emitted that the draft has not read yet
    produced, windows = 0, []
    while produced < len(continuation):
        window = min(k, len(continuation) - produced)
        cached = draft.lengths[0]
        drafted: list[int] = []
        logits = draft.forward(pending, cached)
        for _ in range(window):
            drafted.append(int(logits[-1].argmax()))
            if len(drafted) < window:
                logits = draft.forward(drafted[-1:], draft.lengths[0])
        truth = continuation[produced : produced + window]
        accepted = 0
        while accepted < window and drafted[accepted] == truth[accepted]:
            accepted += 1
        windows.append((window, accepted))
        emitted = continuation[produced : produced + accepted + 1]  # the accepted tokens and the target's own
        produced += len(emitted)
        # keep the draft's cache up to the last accepted token it has read; feed it the rest next time
        kept_drafted = min(accepted, window - 1)
        draft.truncate(0, cached + len(pending) + kept_drafted)
        pending = emitted[kept_drafted:]
    return windows


def window_figures(k: int, windows: Sequence[tuple[int, int]]) -> WindowFigures:
    reached = [sum(1 for w, a in windows if w > i and a >= i) for i in range(k)]
    taken = [sum(1 for w, a in windows if w > i and a > i) for i in range(k)]
    return WindowFigures(k, len(windows), sum(w for w, _ in windows), sum(a for _, a in windows),
                         tuple(t / r if r else 0.0 for t, r in zip(taken, reached)),
                         tuple(sum(1 for _, a in windows if a == n) for n in range(k + 1)))


def decode_ms(runner: ModelRunner, prompt: list[int], steps: int = DECODE_STEPS) -> float:
    runner.truncate(0, 0)
    runner.forward(prompt, 0)
    begin = time.perf_counter()
    for i in range(steps):
        runner.forward([prompt[i % len(prompt)]], len(prompt) + i)
    return (time.perf_counter() - begin) / steps * 1e3


def evaluate_pair(draft_dir: Path, target_dir: Path, texts: Sequence[str], max_new_tokens: int,
                  ks: Sequence[int]) -> PairReport:
    """The figures above for `texts` on one CPU thread (the threads are restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = load_tokenizer(target_dir)
        draft, target = ModelRunner.from_checkpoint(draft_dir), ModelRunner.from_checkpoint(target_dir)
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size}) is not the target's "
                             f"({target.config.vocab_size})")
        eos = set(target.config.eos_token_ids)
        budget = min(draft.max_seq_len, target.max_seq_len) - max_new_tokens - 1
        prompts = [tokenizer(text, add_special_tokens=False)["input_ids"][-budget:] for text in texts]
        prompts = [prompt for prompt in prompts if prompt]
        continuations = [greedy_continuation(target, prompt, max_new_tokens, eos) for prompt in prompts]
        matches = positions = 0
        for prompt, continuation in zip(prompts, continuations):
            m, n = agreement(draft, prompt, continuation)
            matches, positions = matches + m, positions + n
        windows = tuple(window_figures(k, [w for p, c in zip(prompts, continuations) for w in speculate(draft, p, c, k)])
                        for k in ks)
        dtype = resolved_dtype(AUTO_DTYPE, "cpu")
        timed = {"draft": ModelRunner.from_checkpoint(draft_dir, dtype=dtype),
                 "target": ModelRunner.from_checkpoint(target_dir, dtype=dtype)}
        samples: dict[str, list[float]] = {"draft": [], "target": []}
        for _ in range(5):  # interleaved, so machine noise hits both alike
            for name, runner in timed.items():
                samples[name].append(decode_ms(runner, prompts[0]))
    finally:
        torch.set_num_threads(threads)
    return PairReport(str(draft_dir), str(target_dir), draft.config.num_params, target.config.num_params,
                      len(prompts), positions, matches / max(positions, 1), windows,
                      statistics.median(samples["draft"]), statistics.median(samples["target"]),
                      "; ".join(dict.fromkeys(runner.numerics for runner in timed.values())))
