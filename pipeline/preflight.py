"""Checks on what a user asked `specpipe launch` for, made before any worker process starts.

Each failure is a ValueError whose message names the option to change; the CLI prints it as one line.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.liveness import Heartbeats
from pipeline.config import DecodeConfig
from workers.errors import SpecpipeError
from workers.model.checkpoint import TOKENIZER_FILES, read_config, tokenizer_fingerprint, weight_files


def check_checkpoints(checkpoints: dict[str, Path]) -> int:
    """`checkpoints` maps an option (--target, --draft) to its directory; returns the shared context
    (the smaller max_position_embeddings). Refuses non-checkpoints and pairs that tokenize apart."""
    configs = {}
    for option, directory in checkpoints.items():
        try:
            configs[option] = read_config(directory)
            weight_files(Path(directory))
        except SpecpipeError as error:
            raise ValueError(f"{option}: {error}") from None
        if option == "--target" and not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
            # the coordinator tokenizes with the target's tokenizer
            raise ValueError(f"--target: checkpoint {str(directory)!r} has no tokenizer files "
                             f"({', '.join(TOKENIZER_FILES)})")
    if "--draft" in configs and "--target" in configs:
        draft, target = configs["--draft"], configs["--target"]
        draft_hash, target_hash = (tokenizer_fingerprint(checkpoints[o]) for o in ("--draft", "--target"))
        if draft.vocab_size != target.vocab_size or draft_hash != target_hash:
            raise ValueError(
                f"draft {str(checkpoints['--draft'])!r} and target {str(checkpoints['--target'])!r} do not share a "
                f"vocabulary (draft: {draft.vocab_size} tokens, tokenizer {draft_hash}; target: {target.vocab_size} "
                f"tokens, tokenizer {target_hash}); pick a --draft trained with the target's tokenizer"
            )
    return min(config.max_position_embeddings for config in configs.values())


def check_prompts(texts: list[str], prompt_ids: list[list[int]], context: int) -> None:
    for number, (text, ids) in enumerate(zip(texts, prompt_ids), 1):
        if not text or not ids:
            raise ValueError(f"prompt {number} is empty; give every --prompt (or --prompts-file line) some text")
        if len(ids) >= context:
            raise ValueError(
                f"prompt {number} is {len(ids)} tokens long but the model's context holds {context} "
                "(prompt plus at least one new token); shorten it"
            )


def check_settings(config: DecodeConfig, context: int, concurrency: int, threads: int, heartbeats: Heartbeats) -> None:
    sampling = config.sampling
    if not math.isfinite(sampling.temperature) or not math.isfinite(sampling.top_p):
        raise ValueError("--temperature and --top-p must be finite numbers")
    config.validate(context)
    for value, option in ((concurrency, "--concurrency"), (threads, "--threads")):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    heartbeats.validate()


def check_device(backend: str, device: str, option: str) -> None:
    """Refuses a device this machine lacks: a torch device, or Tenstorrent chips absent from the host
    (checked from the driver's device files, without importing ttnn)."""
    try:
        if backend == "ttnn":
            from workers.backends.ttnn_device import check_chips_present, parse_device

            chips = parse_device(device, "target" if option == "--target-device" else "draft")
            if chips is not None:
                check_chips_present(chips)
            return
        from workers.backends.torch_device import resolve_device

        resolve_device(device)
    except SpecpipeError as error:
        raise ValueError(f"{option}: {error}") from None


def check_dtype(dtype: str) -> None:
    from workers.backends.torch_device import DTYPES
    from workers.backends.cpu_fp16 import FP16_WEIGHTS

    if dtype not in ("auto", FP16_WEIGHTS, *DTYPES):
        raise ValueError(f"--dtype {dtype!r} is not one of auto, {FP16_WEIGHTS}, {', '.join(DTYPES)}")
