"""Checks on a well-typed request before it reaches the model.

The protocol layer guarantees types; this guarantees ranges, so that nothing a client sends can make
the model raise (a model exception is fatal to the worker) or loop: a bad request gets a non-fatal
ErrorReply instead.
"""

from __future__ import annotations

import torch

from workers.protocol.limits import MAX_BRANCHES
from workers.protocol.messages import DraftRequest, PrefillChunk, SpeculateRequest, VerifyNext, VerifyRequest


def check_request(message: object, vocab_size: int, max_seq_len: int) -> None:
    """Raises ValueError if a Draft/Speculate/VerifyRequest, PrefillChunk or VerifyNext cannot be served by a model
    of this size (a batch's items are checked one by one)."""
    if isinstance(message, VerifyNext):
        return _check_verify_next(message, vocab_size, max_seq_len)
    if not isinstance(message, (DraftRequest, SpeculateRequest, VerifyRequest, PrefillChunk)):
        return
    _check_positions(message.start, message.feed, vocab_size, max_seq_len)
    if isinstance(message, PrefillChunk):
        return
    if isinstance(message, (DraftRequest, SpeculateRequest)):
        if not 1 <= message.count <= max_seq_len:
            raise ValueError(f"count must lie in [1, {max_seq_len}], got {message.count}")
        if not 0 <= message.alternatives < vocab_size:
            raise ValueError(f"alternatives must lie in [0, {vocab_size}), got {message.alternatives}")
    if isinstance(message, SpeculateRequest):
        _check_branches(message, vocab_size, max_seq_len)
    if isinstance(message, VerifyRequest):
        if not 0 <= message.drafted < len(message.feed):
            raise ValueError(f"a window of {len(message.feed)} tokens cannot carry {message.drafted} drafted ones")
        _check_distributions(message.probs, message.drafted, vocab_size)
    message.sampling.validate(vocab_size)


def _check_verify_next(message: VerifyNext, vocab_size: int, max_seq_len: int) -> None:
    branches = len(message.windows)
    if not 1 <= branches <= MAX_BRANCHES or len(message.accepted) != branches or len(message.next_tokens) != branches:
        raise ValueError(f"VerifyNext needs 1 to {MAX_BRANCHES} branches, each with accepted, next token and window")
    if any(not window for window in message.windows) or any(not 0 <= a < max_seq_len for a in message.accepted):
        raise ValueError("every branch needs a non-empty window and a count of accepted tokens in the context")
    tokens = message.next_tokens + [t for window in message.windows for t in window]
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    if sum(map(len, message.windows)) > max_seq_len:
        raise ValueError(f"the windows hold more tokens than the context of {max_seq_len}")
    _check_distributions(message.probs, sum(map(len, message.windows)), vocab_size)
    message.sampling.validate(vocab_size)


def _check_branches(message: SpeculateRequest, vocab_size: int, max_seq_len: int) -> None:
    end = message.start + len(message.feed)
    if len(message.forks) != len(message.heads):
        raise ValueError(f"{len(message.forks)} forks but {len(message.heads)} heads: one of each per branch")
    if not 0 <= message.bonus_guesses <= min(vocab_size, MAX_BRANCHES):
        raise ValueError(f"bonus_guesses must lie in [0, {min(vocab_size, MAX_BRANCHES)}]")
    branches = len(message.heads) + message.bonus_guesses
    if not 1 <= branches <= MAX_BRANCHES:
        raise ValueError(f"a speculation drafts 1 to {MAX_BRANCHES} branches, got {branches}")
    if any(not 0 <= fork < end for fork in message.forks):
        raise ValueError(f"forks must lie in [0, {end}) (the positions read)")
    if message.heads and (min(message.heads) < 0 or max(message.heads) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    if end + message.count > max_seq_len:
        raise ValueError(f"drafting {message.count} tokens after position {end} would pass the context of {max_seq_len}")


def _check_positions(start: int, feed: list[int], vocab_size: int, max_seq_len: int) -> None:
    if not feed:
        raise ValueError("feed is empty: a request must read at least one token")
    if not 0 <= start < max_seq_len or start + len(feed) > max_seq_len:
        raise ValueError(f"positions {start}..{start + len(feed) - 1} lie outside the context of {max_seq_len}")
    if min(feed) < 0 or max(feed) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size})")


def _check_distributions(probs: torch.Tensor | None, rows: int, vocab_size: int) -> None:
    """The draft's distributions sent along with `rows` drafted tokens: [rows, vocab] probabilities."""
    if probs is None:
        return
    if tuple(probs.shape) != (rows, vocab_size):
        raise ValueError(f"expected the draft's distributions as {rows}x{vocab_size} values, got "
                         f"{'x'.join(map(str, probs.shape))}")
    if not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError("the draft's distributions must hold probabilities in [0, 1]")
