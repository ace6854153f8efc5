"""Reading Hugging Face checkpoint directories: config.json, safetensors shards, tokenizer files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from workers.errors import CheckpointError
from workers.model.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a Hugging Face checkpoint: it has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from None
    try:
        return ModelConfig.from_hf(raw)
    except KeyError as error:
        raise CheckpointError(f"{config_file} lacks the field {error.args[0]!r}") from None


def weight_files(directory: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, checked against its index when there is one."""
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        names = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {str(directory)!r} is partial: its index names {len(names)} shards "
                f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
            )
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = (
            f" (it has {', '.join(pickled)}: pickled weights are never loaded; convert them to safetensors)"
            if pickled
            else ""
        )
        raise CheckpointError(f"checkpoint {str(directory)!r} has no *.safetensors weights{hint}")
    return files


class CheckpointWeights(Mapping[str, Tensor]):
    """A checkpoint's tensors by their Hugging Face names, each read from its shard (memory-mapped by
    safetensors) when asked for and not kept: a loader that packs tensor by tensor never holds a second copy
    of the whole checkpoint."""

    def __init__(self, directory: str | Path) -> None:
        self._shards = []
        self._where: dict[str, Any] = {}
        for file in weight_files(Path(directory)):
            try:
                shard = safe_open(str(file), framework="pt")
                self._where.update(dict.fromkeys(shard.keys(), (shard, file)))
            except Exception as error:  # safetensors raises several types for truncated or corrupt files
                raise CheckpointError(f"cannot read weights from {file}: {error}") from None
            self._shards.append(shard)

    def __getitem__(self, name: str) -> Tensor:
        shard, file = self._where[name]
        try:
            return shard.get_tensor(name)
        except Exception as error:
            raise CheckpointError(f"cannot read {name} from {file}: {error}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf_weights(directory: str | Path) -> CheckpointWeights:
    """All tensors of a checkpoint by their Hugging Face names, read as they are asked for."""
    return CheckpointWeights(directory)


def check_weight_names(config: ModelConfig, hf: dict[str, Tensor], directory: str | Path) -> None:
    """Refuses a checkpoint that lacks any tensor the decoder needs, naming the first few."""
    from workers.model.llama import hf_weight_names

    missing = [name for name in hf_weight_names(config) if name not in hf]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"checkpoint {str(directory)!r} lacks weights {', '.join(missing[:3])}{more} "
            "(is it partial, or not a Llama-family model?)"
        )


PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")  # a tokenizer.json and nothing more


def _tokenizer_class(path: Path) -> str | None:
    try:
        return json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def load_tokenizer(directory: str | Path) -> Any:
    """The checkpoint's tokenizer through transformers' AutoTokenizer (never downloads)."""
    path = Path(directory)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"checkpoint {str(path)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        if _tokenizer_class(path) in PLAIN_TOKENIZER_CLASSES:
            # what AutoTokenizer picks for these, without importing the model's config class first (seconds of
            # transformers imports at every command's start)
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot load the tokenizer in {str(path)!r}: {error}") from None


def tokenizer_fingerprint(directory: str | Path) -> str:
    """A hash of the tokenizer files, so two workers can check they tokenize alike."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = Path(directory) / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
