"""Checks on what a user asked for, made before any worker process starts.

Each failure is a ValueError whose message names the option to change; the CLI prints it as one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DecodeConfig, ModelsConfig, WorkersConfig
from workers.errors import SpecpipeError
from workers.model.checkpoint import TOKENIZER_FILES, read_config, tokenizer_fingerprint, weight_files
from workers.protocol.messages import Ready


@dataclass(frozen=True)
class Vocabulary:
    """What a model tokenizes with: read from its checkpoint here, or from its worker's Ready."""

    model: str  # the checkpoint's directory, or the model a worker serves
    size: int
    tokenizer_hash: str

    @classmethod
    def of_worker(cls, ready: Ready) -> "Vocabulary":
        return cls(ready.model, ready.vocab_size, ready.tokenizer_hash)


def check_shared_vocabulary(draft: Vocabulary, target: Vocabulary) -> None:
    """Refuses a draft/target pair that does not share one vocabulary (speculation compares token ids)."""
    if draft.size != target.size or draft.tokenizer_hash != target.tokenizer_hash:
        raise ValueError(
            f"draft {draft.model!r} and target {target.model!r} do not share a vocabulary "
            f"(draft: {draft.size} tokens, tokenizer {draft.tokenizer_hash}; target: {target.size} tokens, "
            f"tokenizer {target.tokenizer_hash}); pick a --draft trained with the target's tokenizer"
        )


def check_checkpoints(models: ModelsConfig, uses_draft: bool) -> int:
    """Refuses non-checkpoints and pairs that tokenize apart; returns the context both models hold (the
    smaller max_position_embeddings)."""
    checkpoints = {"--target": models.target_dir, **({"--draft": models.draft_dir} if uses_draft else {})}
    configs = {}
    for option, directory in checkpoints.items():
        try:
            configs[option] = read_config(directory)
            weight_files(Path(directory))
        except SpecpipeError as error:
            raise ValueError(f"{option}: {error}") from None
    if not any((Path(models.target_dir) / name).is_file() for name in TOKENIZER_FILES):
        # the coordinator tokenizes with the target's tokenizer
        raise ValueError(f"--target: checkpoint {str(models.target_dir)!r} has no tokenizer files "
                         f"({', '.join(TOKENIZER_FILES)})")
    if uses_draft:
        draft, target = (Vocabulary(str(checkpoints[o]), configs[o].vocab_size, tokenizer_fingerprint(checkpoints[o]))
                         for o in ("--draft", "--target"))
        check_shared_vocabulary(draft, target)
    return min(config.max_position_embeddings for config in configs.values())


def check_workers(workers: WorkersConfig) -> None:
    """The dtype, thread count, draft niceness and devices of the workers to spawn."""
    if workers.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {workers.threads}")
    if workers.max_model_len < 0:
        raise ValueError(f"--max-model-len must be at least 1 (or 0 for the model's context), got {workers.max_model_len}")
    for flag, count in (("--target-threads", workers.target_threads), ("--draft-threads", workers.draft_threads)):
        if count < 0:
            raise ValueError(f"{flag} must be at least 1 (or 0 for --threads), got {count}")
    if not 0 <= workers.draft_nice <= 19:
        raise ValueError(f"--draft-nice takes a niceness to add from 0 to 19, got {workers.draft_nice}")
    for role in ("target", "draft"):
        check_device(workers.backend, workers.device(role), f"--{role}-device")


def check_prompts(texts: list[str], prompt_ids: list[list[int]], context: int) -> None:
    for number, (text, ids) in enumerate(zip(texts, prompt_ids), 1):
        if not text or not ids:
            raise ValueError(f"prompt {number} is empty; give every --prompt (or --prompts-file line) some text")
        if len(ids) >= context:
            raise ValueError(
                f"prompt {number} is {len(ids)} tokens long but the model's context holds {context} "
                "(prompt plus at least one new token); shorten it"
            )


def check_settings(config: DecodeConfig, context: int, concurrency: int) -> None:
    config.validate(context)  # sampling settings included (SamplingParams.validate)
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")


def check_device(backend: str, device: str, option: str) -> None:
    """Refuses a device this machine lacks: a torch device, or Tenstorrent chips absent from the host
    (checked from the driver's device files, or the simulator TT_METAL_SIMULATOR names, without importing
    ttnn), or a host without the SFPI compiler tt-metal builds kernels with."""
    try:
        if backend == "ttnn":
            from workers.backends.ttnn_device import check_chips_present, check_sfpi, parse_device, ttnn_package_dir

            chips = parse_device(device, "target" if option == "--target-device" else "draft")
            if chips is not None:
                check_chips_present(chips)
                check_sfpi(ttnn_package_dir())
            return
        from workers.backends.torch_device import resolve_device

        resolve_device(device)
    except SpecpipeError as error:
        raise ValueError(f"{option}: {error}") from None

