"""Reading Hugging Face checkpoint directories: config.json, safetensors shards, tokenizer files."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class CheckpointWeights(Mapping[str, Tensor]):
    """A checkpoint's tensors by their Hugging Face names, each read from its shard when asked for and not
    kept: a loader that packs tensor by tensor never holds a second copy of the checkpoint. Read, not
    memory-mapped: a mapped shard's pages would count in the worker's resident memory until it closed."""

    def __init__(self, directory: str | Path) -> None:
        self._where: dict[str, tuple[Path, int, int, torch.dtype, list[int]]] = {}
        for file in weight_files(Path(directory)):
            try:
                with open(file, "rb") as stream:
                    header_bytes = struct.unpack("<Q", stream.read(8))[0]
                    header = json.loads(stream.read(header_bytes))
                start = 8 + header_bytes
                for name, entry in header.items():
                    if name == "__metadata__":
                        continue
                    begin, end = entry["data_offsets"]
                    dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], list(entry["shape"])
                    if end - begin != math.prod(shape) * dtype.itemsize:
                        raise ValueError(f"{name}: {end - begin} bytes for shape {shape} of {entry['dtype']}")
                    self._where[name] = (file, start + begin, end - begin, dtype, shape)
            except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
                raise CheckpointError(f"cannot read weights from {file}: {error!r}") from None

    def __getitem__(self, name: str) -> Tensor:
        file, offset, size, dtype, shape = self._where[name]
        data = torch.empty(size, dtype=torch.uint8)
        with open(file, "rb") as stream:
            stream.seek(offset)
            got = stream.readinto(data.numpy()) if size else 0
        if got != size:
            raise CheckpointError(f"cannot read {name} from {file}: {got} of its {size} bytes (truncated?)")
        return data.view(dtype).reshape(shape)

    def __contains__(self, name: object) -> bool:  # without reading the tensor, as Mapping's would
        return name in self._where

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
