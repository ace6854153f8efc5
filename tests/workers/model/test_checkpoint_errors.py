"""Bad checkpoints and bad calls fail with one clear specpipe error, not a deep traceback."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import write_checkpoint
from workers.errors import CacheCapacityError, CheckpointError, DeviceError, UnsupportedModelError
from workers.model import ModelRunner


@pytest.fixture
def llama_dir(checkpoints, tmp_path):
    directory = tmp_path / "llama"
    shutil.copytree(checkpoints["llama3-gqa"][0], directory)
    return directory


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ModelRunner.from_checkpoint(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        ModelRunner.from_checkpoint(tmp_path)


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(tmp_path):
    model = write_checkpoint("llama3-gqa", tmp_path, max_shard_size="60KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    ids = torch.arange(20)
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    assert torch.allclose(ModelRunner.from_checkpoint(tmp_path).forward(ids, 0), expected, atol=1e-4)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"partial.*{shards[1].name}"):
        ModelRunner.from_checkpoint(tmp_path)


def test_missing_weight_is_named(llama_dir):
    weights = load_file(llama_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, llama_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        ModelRunner.from_checkpoint(llama_dir)


def test_wrong_shape_is_refused(llama_dir):
    weights = load_file(llama_dir / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(weights, llama_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not match"):
        ModelRunner.from_checkpoint(llama_dir)


def test_pickled_weights_are_never_loaded(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        ModelRunner.from_checkpoint(llama_dir)


def test_corrupt_safetensors(llama_dir):
    (llama_dir / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        ModelRunner.from_checkpoint(llama_dir)


def test_unsupported_architecture_is_named(llama_dir):
    edit_config(llama_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ModelRunner.from_checkpoint(llama_dir)


def test_unsupported_rope_type_is_named(llama_dir):
    edit_config(llama_dir, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelRunner.from_checkpoint(llama_dir)


def test_positions_beyond_the_cache(checkpoints):
    runner = ModelRunner.from_checkpoint(checkpoints["llama-tied"][0], max_seq_len=16)
    with pytest.raises(CacheCapacityError, match="beyond the KV cache of 16"):
        runner.forward(list(range(17)), 0)
    runner.forward(list(range(16)), 0)
    with pytest.raises(CacheCapacityError, match="beyond"):
        runner.forward([3], 16)


def test_positions_must_not_leave_a_gap_and_must_be_consecutive(checkpoints):
    runner = ModelRunner.from_checkpoint(checkpoints["llama-tied"][0])
    runner.forward([1, 2, 3], 0)
    with pytest.raises(CacheCapacityError, match="gap"):
        runner.forward([4], 5)
    with pytest.raises(ValueError, match="consecutive"):
        runner.forward([4, 5], [3, 5])


def test_token_ids_outside_the_vocabulary(checkpoints):
    runner = ModelRunner.from_checkpoint(checkpoints["llama-tied"][0])
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        runner.forward([1, 128], 0)


def test_max_seq_len_beyond_the_model(checkpoints):
    with pytest.raises(CacheCapacityError, match="max_position_embeddings"):
        ModelRunner.from_checkpoint(checkpoints["llama-tied"][0], max_seq_len=100_000)


@pytest.mark.parametrize("device, message", [("tpu", "tpu"), ("cuda:7", "cuda:7"), ("banana", "banana")])
def test_unknown_device(checkpoints, device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    with pytest.raises(DeviceError, match=message):
        ModelRunner.from_checkpoint(checkpoints["llama-tied"][0], device=device)
