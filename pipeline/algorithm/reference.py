"""The whole algorithm in one synchronous loop, in the manner of gpt-fast's `speculative_decode`:
draft k tokens, verify them in one target pass, keep the accepted prefix and the target's own next token.

No scheduler, no messages, no processes: two model runners and the acceptance rules. The tests use
it as the oracle for every mode of the pipeline (greedy output must equal it token for token), and it
says in one short loop what the scheduler does with drafting ahead, chaining and many sequences.
"""

from __future__ import annotations

import torch

from pipeline.config import DecodeConfig
from workers.model.runner_base import RunnerBase
from workers.sampling import greedy_accept, keyed_accept, keyed_pick, probabilities, rejection_accept, sample


def reference_decode(target: RunnerBase, draft: RunnerBase | None, prompt: list[int], config: DecodeConfig,
                     eos_ids: frozenset[int], max_context: int | None = None) -> list[int]:
    """The tokens generated after `prompt`: target-only decoding when config.mode is target-only (or no
    draft is given), speculative decoding with windows of config.k otherwise."""
    max_context = max_context or target.max_seq_len
    speculative = config.uses_draft and draft is not None
    sampling = config.sampling
    generator = None if sampling.greedy else torch.Generator().manual_seed(sampling.seed)
    target_slot = target.allocate_slot()
    draft_slot = draft.allocate_slot() if speculative else None
    tokens, draft_cached = list(prompt), 0  # draft_cached: positions of `tokens` in the draft's cache

    def pick(logits: torch.Tensor, position: int) -> tuple[int, torch.Tensor | None]:
        """The token at `position` from its [V] logits, and the distribution it was drawn from."""
        if generator is None:
            return int(logits.argmax()), None
        probs = probabilities(logits[None], sampling)[0]
        if sampling.reproducible:
            return keyed_pick(probs[None], sampling.seed, [position])[0], probs
        return sample(probs, generator), probs

    try:
        # the prompt in one pass; its last row gives the first token
        next_token, _ = pick(target.forward(prompt, 0, target_slot, last=1, prompt_pass=True)[-1], len(prompt))
        new = [next_token]
        while True:
            for token in new:  # commit, up to an EOS
                tokens.append(token)
                if token in eos_ids:
                    return tokens[len(prompt) :]
            generated = len(tokens) - len(prompt)
            if generated >= config.max_new_tokens or len(tokens) >= max_context:
                return tokens[len(prompt) :]
            # the target's cache holds all but the last committed token
            k = min(config.k, config.max_new_tokens - generated - 1, max_context - len(tokens) - 1)
            if not speculative or k == 0:
                logits = target.forward([tokens[-1]], len(tokens) - 1, target_slot)
                new = [pick(logits[-1], len(tokens))[0]]
                continue
            # draft k tokens: catch the draft's cache up with the committed tokens, then one token per pass
            logits = draft.forward(tokens[draft_cached:], draft_cached, draft_slot, last=1,
                                   prompt_pass=draft_cached == 0)
            proposal, proposal_probs = [], []
            while True:
                token, probs = pick(logits[-1], len(tokens) + len(proposal))
                proposal.append(token)
                proposal_probs.append(probs)
                if len(proposal) == k:
                    break
                logits = draft.forward([token], len(tokens) + len(proposal) - 1, draft_slot)
            # verify the window in one pass: row i judges proposal[i], the last row gives the bonus token
            logits = target.forward([tokens[-1], *proposal], len(tokens) - 1, target_slot)
            if generator is None:
                accepted, next_token = greedy_accept(logits, proposal)
            elif sampling.reproducible:
                accepted, next_token = keyed_accept(probabilities(logits, sampling), proposal, sampling.seed,
                                                    len(tokens))
            else:
                accepted, next_token = rejection_accept(probabilities(logits, sampling), proposal,
                                                        torch.stack(proposal_probs), generator)
            # roll both caches back to what stays: rejected tokens' keys and values are never read again
            target.truncate(target_slot, len(tokens) + accepted)
            draft_cached = len(tokens) + min(accepted, k - 1)
            draft.truncate(draft_slot, draft_cached)
            new = proposal[:accepted] + [next_token]
    finally:
        target.free_slot(target_slot)
        if draft_slot is not None:
            draft.free_slot(draft_slot)
