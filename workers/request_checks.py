"""Checks on a well-typed request before it reaches the model.

The protocol layer guarantees types; this guarantees ranges, so that nothing a client sends can make
the model raise (a model exception is fatal to the worker) or loop: a bad request gets a non-fatal
ErrorReply instead.
"""

from __future__ import annotations

import math

import torch

from pipeline.protocol import DraftRequest, VerifyRequest
from workers.sampling import SamplingParams


def check_request(message: object, vocab_size: int, max_seq_len: int) -> None:
    """Raises ValueError if a Draft/VerifyRequest cannot be served by a model of this size."""
    if not isinstance(message, (DraftRequest, VerifyRequest)):
        return
    _check_positions(message.start, message.feed, vocab_size, max_seq_len)
    if isinstance(message, DraftRequest) and not 1 <= message.count <= max_seq_len:
        raise ValueError(f"count must lie in [1, {max_seq_len}], got {message.count}")
    if isinstance(message, VerifyRequest) and not 0 <= message.drafted < len(message.feed):
        raise ValueError(f"a window of {len(message.feed)} tokens cannot carry {message.drafted} drafted ones")
    _check_sampling(message.sampling, vocab_size)


def _check_positions(start: int, feed: list[int], vocab_size: int, max_seq_len: int) -> None:
    if not feed:
        raise ValueError("feed is empty: a request must read at least one token")
    if not 0 <= start < max_seq_len or start + len(feed) > max_seq_len:
        raise ValueError(f"positions {start}..{start + len(feed) - 1} lie outside the context of {max_seq_len}")
    if min(feed) < 0 or max(feed) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size})")


def _check_sampling(sampling: SamplingParams, vocab_size: int) -> None:
    if not (math.isfinite(sampling.temperature) and math.isfinite(sampling.top_p)):
        raise ValueError("temperature and top-p must be finite numbers")
    sampling.validate()
    if sampling.top_k > vocab_size or not 0 <= sampling.seed < 2**63:
        raise ValueError(f"top-k must be at most {vocab_size} and the seed in [0, 2**63)")


def check_distributions(probs: torch.Tensor | None) -> None:
    """The draft's distributions sent along with a window: finite probabilities."""
    if probs is not None and not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError("the draft's distributions must hold probabilities in [0, 1]")
