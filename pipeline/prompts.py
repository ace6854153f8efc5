"""Which prompts a command runs, from its PromptsConfig: the --prompt texts and lines of --prompts-file.

The warm-up prompts (--warmup, run first and reported apart) are the file's first lines; the
measured ones are the --prompt texts followed by the next --prompts lines. Without --prompts-file,
bench and profile read their lines from the bundled held-out code prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PromptsConfig


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A prompt's tokens as transformers and vLLM make them by default: with the tokenizer's special tokens
    (a Llama prompt starts with its BOS; the bundled pair's tokenizer adds none). Every command and
    /v1/completions tokenize through here, so that their outputs stay identical."""
    return tokenizer(text)["input_ids"]


@dataclass(frozen=True)
class Prompts:
    warmup: list[str]  # run first, reported apart
    measured: list[str]


def read_prompts_file(path: Path) -> list[str]:
    """One JSON string per line; blank lines are skipped."""
    texts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number} is not a JSON string (--prompts-file wants one per line)") from None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{number} holds a {type(text).__name__}, not a JSON string")
        texts.append(text)
    return texts


def select_prompts(config: PromptsConfig, bundled: Path | None = None) -> Prompts:
    """The prompts `config` names; `bundled` (a prompts file) stands in for a --prompts-file not given."""
    config.validate()
    file = config.file or bundled
    measured_from_file = config.file is not None or not config.texts  # `bundled` lines only without --prompt
    lines = read_prompts_file(file) if file is not None and (measured_from_file or config.warmup) else []
    measured = list(config.texts)
    if measured_from_file:
        end = None if config.count is None else config.warmup + config.count
        measured += lines[config.warmup:end]
        wanted, asked = end or config.warmup, f"--warmup {config.warmup} plus --prompts {config.count} need"
    else:
        wanted, asked = config.warmup, f"--warmup {config.warmup} needs"
    if len(lines) < wanted:
        raise ValueError(f"{file} holds {len(lines)} prompts; {asked} {wanted}")
    return Prompts(lines[: config.warmup], measured)
