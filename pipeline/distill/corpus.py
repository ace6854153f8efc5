"""The text a draft learns on: Python source from directories, deduplicated, as token streams."""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

TEST_DIRS = {"test", "tests", "idle_test"}
VALIDATION_PERCENT = 2  # documents kept out of training to watch the loss on


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    validation: list[str]
    sources: tuple[str, ...]  # what was read, for the checkpoint's training.json
    duplicates: int


def standard_library() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(directory: Path, skip_tests: bool) -> list[Path]:
    """Every *.py file under `directory`, sorted; with `skip_tests`, none under a test directory or named test_*."""
    files = []
    for path in sorted(directory.rglob("*.py")):
        parts = set(path.relative_to(directory).parts[:-1])
        if skip_tests and (parts & TEST_DIRS or "site-packages" in parts or path.name.startswith("test_")):
            continue
        files.append(path)
    return files


def read_corpus(directories: Sequence[Path]) -> Corpus:
    """Every *.py file of `directories` (none: the standard library of this interpreter, tests left out),
    each distinct text once; VALIDATION_PERCENT of them, chosen by a hash of the text, for validation."""
    chosen = list(directories) or [standard_library()]
    seen: set[str] = set()
    train, validation, duplicates = [], [], 0
    for directory in chosen:
        for path in source_files(directory, skip_tests=not directories):
            text = path.read_text(encoding="utf-8", errors="replace")
            digest = hashlib.sha256("\n".join(line.rstrip() for line in text.splitlines()).encode()).hexdigest()
            if digest in seen or not text.strip():
                duplicates += digest in seen
                continue
            seen.add(digest)
            (validation if int(digest, 16) % 100 < VALIDATION_PERCENT else train).append(text)
    if not train:
        raise ValueError(f"no Python source to learn on under {', '.join(map(str, chosen))} (--corpus)")
    return Corpus(train, validation or train[:1], tuple(map(str, chosen)), duplicates)


def token_stream(tokenizer, texts: Iterable[str], eos_id: int) -> Tensor:
    """All texts as one stream of token ids [N], each followed by the end-of-text token."""
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32)


def sample_windows(stream: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """`batch` random windows [batch, length] of the stream (shorter streams are repeated to fit)."""
    if stream.numel() <= length:
        stream = stream.repeat(length // max(1, stream.numel()) + 2)
    starts = torch.randint(0, stream.numel() - length, (batch,), generator=generator)
    return torch.stack([stream[start : start + length] for start in starts.tolist()]).long()
