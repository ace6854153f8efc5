"""Turning logits into the distribution a token is drawn from, and the acceptance rules.

The same `SamplingParams` shape both models' distributions (temperature, then top-k, then top-p),
so speculative sampling reproduces the target's *filtered* distribution exactly, as vLLM does.
Temperature 0 means greedy.

Two ways to sample speculatively, both exact:
  * rejection sampling (the default): the most drafted tokens accepted, but what comes out depends on
    how the randomness of each sequence's generator was consumed, which depends on window sizes and timing;
  * position-keyed (`reproducible`): the token at position t is argmax_x p_t(x) / E_t(x), with E_t ~ Exp(1)
    drawn from (seed, t) alone: an exact draw from p_t (the exponential race, i.e. the Gumbel-max trick),
    and the same whatever was drafted. The draft proposes argmax_x q_t(x) / E_t(x) with the same noise, so
    it is accepted where the two races have the same winner: a little less often than under rejection
    sampling (at total variation d, at most 2d/(1+d) of the tokens mismatch instead of d), in exchange for
    the same seed and prompt giving the same text in every mode, batch and run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_TEMPERATURE = 1e-6
MAX_SEED = 2**63  # seeds travel as msgpack integers and seed torch generators


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    reproducible: bool = False  # position-keyed noise: the same seed and prompt give the same text (see above)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_draft_probs(self) -> bool:
        """Whether verifying a draft needs the distributions its tokens were drawn from (rejection sampling)."""
        return not self.greedy and not self.reproducible

    def validate(self, vocab_size: int | None = None) -> None:
        """The one check of sampling settings, at the coordinator (before any process starts) and at each
        worker (for every request): finite numbers in range; top-k within the vocabulary when it is known."""
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise ValueError(f"--temperature and --top-p must be finite numbers, got {self.temperature} and "
                             f"{self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / temperature would overflow to inf, then NaN
            raise ValueError(f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must lie in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0 or (vocab_size is not None and self.top_k > vocab_size):
            bound = f" and at most the vocabulary's {vocab_size}" if vocab_size is not None else ""
            raise ValueError(f"--top-k must be >= 0 (0 = off){bound}, got {self.top_k}")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"--seed must lie in [0, 2**63), got {self.seed}")


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """[T, V] logits -> [T, V] float32 probabilities after temperature, top-k and top-p."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        drop[..., 0] = False  # the likeliest token always stays (a top_p below float32's range rounds to 0)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, generator: torch.Generator) -> int:
    """One token from a [V] distribution."""
    return int(torch.multinomial(probs, 1, generator=generator))


def greedy_accept(target_logits: Tensor, drafted: list[int]) -> tuple[int, int]:
    """Longest prefix of `drafted` matching the target's argmax, and the target's next token.

    target_logits: [len(drafted) + 1, V]; row i predicts the token after drafted[:i].
    """
    choices = target_logits.argmax(-1).tolist()
    accepted = 0
    while accepted < len(drafted) and drafted[accepted] == choices[accepted]:
        accepted += 1
    return accepted, choices[accepted]


def rejection_accept(
    target_probs: Tensor, drafted: list[int], draft_probs: Tensor | None, generator: torch.Generator
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Token i is accepted with probability min(1, p_i(x) / q_i(x)); at the first rejection the
    replacement is drawn from normalise(max(0, p_i - q_i)); if all are accepted the bonus token is
    drawn from p_k. The emitted tokens are then distributed exactly as sampling from p.

    target_probs: [k + 1, V]; draft_probs: [k, V] (the distributions the drafted tokens came from;
    None when nothing was drafted).
    """
    uniforms = torch.rand(len(drafted), generator=generator).tolist()
    for i, token in enumerate(drafted):
        assert draft_probs is not None
        p, q = float(target_probs[i, token]), float(draft_probs[i, token])
        if q > 0 and uniforms[i] * q <= p:  # u <= p/q, without dividing
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
        total = float(residual.sum())
        # p == q leaves no residual mass; then any rejection had probability 0, so fall back to p
        return i, sample(residual / total if total > 0 else target_probs[i], generator)
    return len(drafted), sample(target_probs[len(drafted)], generator)


_MASK64 = (1 << 64) - 1


def _position_seed(seed: int, position: int) -> int:
    """A generator seed for (seed, position): splitmix64's finaliser, the same on every host and Python."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xD1B54A32D192ED03 + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & (_MASK64 >> 1)


def position_noise(seed: int, position: int, vocab_size: int) -> Tensor:
    """[V] float32 Exp(1) draws belonging to one position of a sequence with this seed."""
    generator = torch.Generator().manual_seed(_position_seed(seed, position))
    return torch.empty(vocab_size).exponential_(generator=generator)


def keyed_pick(probs: Tensor, seed: int, positions: list[int]) -> list[int]:
    """Per row of [R, V] probabilities, the token the exponential race keyed by (seed, positions[r]) picks:
    an exact draw from that row, and the same wherever and however often it is computed."""
    noise = torch.stack([position_noise(seed, position, probs.shape[-1]) for position in positions])
    return (probs.float() / noise.to(probs.device)).argmax(-1).tolist()


def keyed_accept(target_probs: Tensor, drafted: list[int], seed: int, first_position: int) -> tuple[int, int]:
    """Position-keyed verification: the longest prefix of `drafted` that the target's own keyed picks agree
    with, and the target's pick after it. target_probs: [len(drafted) + 1, V], row i for the token at
    first_position + i."""
    choices = keyed_pick(target_probs, seed, list(range(first_position, first_position + len(drafted) + 1)))
    accepted = 0
    while accepted < len(drafted) and drafted[accepted] == choices[accepted]:
        accepted += 1
    return accepted, choices[accepted]
