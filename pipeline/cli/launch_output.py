"""What `specpipe launch` prints: streamed text and a stats line, or one JSON object per prompt."""

from __future__ import annotations

import json
import sys
from typing import Any

from pipeline.algorithm.scheduler import Sequence
from pipeline.config import DecodeConfig


def result_record(sequence: Sequence, prompt: str, text: str, config: DecodeConfig) -> dict[str, Any]:
    stats = sequence.stats
    generated = sequence.generated
    wall = (stats.finished_at or stats.started) - stats.started
    return {
        "prompt": prompt,
        "text": text,
        "token_ids": generated,
        "mode": config.mode,
        "k": config.k,
        "new_tokens": len(generated),
        "wall_s": wall,
        "tokens_per_s": len(generated) / wall if wall > 0 else 0.0,
        "ttft_s": (stats.first_token_at or stats.started) - stats.started,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "acceptance_rate": stats.accepted / stats.drafted if stats.drafted else 0.0,
        "mean_acceptance_length": (stats.accepted + stats.verifications) / stats.verifications
        if stats.verifications else 0.0,
        "verifications": stats.verifications,
        "predraft_hits": stats.predraft_hits,
        "predraft_misses": stats.predraft_misses,
        "finish_reason": sequence.finish_reason,
    }


class ResultPrinter:
    def __init__(self, tokenizer, prompts: list[str], config: DecodeConfig, json_lines: bool, stream: bool) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.config = config
        self.json_lines = json_lines  # --json
        self.stream = stream
        self._shown: dict[int, int] = {}  # characters of each sequence's text already printed

    def text(self, sequence: Sequence) -> str:
        return self.tokenizer.decode(sequence.generated, skip_special_tokens=True)

    def on_tokens(self, sequence: Sequence, new_tokens: list[int]) -> None:
        if not self.stream:
            return
        text = self.text(sequence)
        if text.endswith("\ufffd") and sequence.finish_reason is None:
            return  # half a UTF-8 character: wait for the rest
        shown = self._shown.get(sequence.seq_id, 0)
        if shown == 0:
            sys.stdout.write(self.prompts[sequence.seq_id])
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        self._shown[sequence.seq_id] = len(text)

    def finish(self, sequences: list[Sequence]) -> None:
        for sequence in sequences:
            record = result_record(sequence, self.prompts[sequence.seq_id], self.text(sequence), self.config)
            if self.json_lines:
                print(json.dumps(record), flush=True)
                continue
            if not self.stream:
                print(self.prompts[sequence.seq_id] + record["text"])
            else:
                print()
            rate = f", acceptance {record['acceptance_rate']:.0%}, mean length {record['mean_acceptance_length']:.2f}" \
                if record["drafted"] else ""
            print(f"-- {record['new_tokens']} tokens in {record['wall_s']:.2f} s ({record['tokens_per_s']:.1f} tokens/s), "
                  f"TTFT {record['ttft_s'] * 1e3:.0f} ms, {self.config.mode} k={self.config.k}{rate}, "
                  f"finish: {record['finish_reason']}", flush=True)
