"""ttnn for real, on a simulated Wormhole cluster (TT_METAL_MOCK_CLUSTER_DESC_PATH and the n150/n300 descriptors
in data/): the worker's chip enumeration and selection, the refusal to open a device it cannot open, and weight
conversion to tiled host tensors and back.

Needs ttnn (Python 3.10/3.12: scripts/setup_ttnn_env.sh); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.workers.model.ttnn_standin import Device, Standin, round_bfp8
from workers.backends.ttnn_device import MOCK_ENV
from workers.model.checkpoint import read_config, read_hf_weights
from workers.model.ttnn_llama import TtModel, host_weights

ttnn = pytest.importorskip("ttnn", reason="needs ttnn (Python 3.10/3.12; scripts/setup_ttnn_env.sh)")
pytestmark = pytest.mark.ttnn

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[3]

# What a worker process does before loading its model, reported as JSON in a file: tt-metal's C++ logger
# writes to the same stdout from its own threads, and a log line can land in the middle of a printed result.
PROBE = """
import json, os, sys
from workers.backends.ttnn_device import (check_chips_present, check_topology, count_chips, import_ttnn,
                                          isolate_process, open_device, parse_device)
from workers.errors import DeviceError
device = parse_device(sys.argv[1], "target")
out = {}
try:
    check_chips_present(device)
    isolate_process(device, "target")
    ttnn = import_ttnn()
    chips = count_chips(ttnn)
    out["chips"] = [chips.total, chips.pcie]
    check_topology(device, chips)
    out["cache"] = os.environ["TT_METAL_CACHE"]
    open_device(ttnn, device, trace_region_size=1 << 20)
    out["opened"] = True
except DeviceError as error:
    out["error"] = str(error)
with open(sys.argv[2], "w") as result:
    json.dump(out, result)
"""


def probe(descriptor: str, device: str, tmp_path: Path) -> dict:
    # a process of its own: the simulated cluster is fixed at first use, and opening writes generated/ into cwd
    env = dict(os.environ, **{MOCK_ENV: str(DATA / descriptor)}, PYTHONPATH=str(REPO))
    result_file = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-c", PROBE, device, str(result_file)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result_file.exists(), (result.stdout + result.stderr)[-2000:]
    return json.loads(result_file.read_text())


@pytest.mark.parametrize("descriptor, device, chips, error", [
    ("wormhole_N150.yaml", "tt:0", [1, 1], None),
    ("wormhole_N150.yaml", "tt:0/1x2", [1, 1], "mesh 1x2 needs 2 chips but PCIe id(s) [0] reach 1 (1 over PCIe)"),
    ("wormhole_N300.yaml", "tt:0", [2, 1], None),
    ("wormhole_N300.yaml", "tt:0/1x2", [2, 1], None),  # one process, both chips of the card as a mesh
    ("wormhole_N300.yaml", "tt:0/2x2", [2, 1], "mesh 2x2 needs 4 chips"),
])
def test_enumeration_and_topology_on_simulated_cards(tmp_path, descriptor, device, chips, error):
    out = probe(descriptor, device, tmp_path)
    assert out["chips"] == chips
    if error:
        assert out["error"].startswith(error), out
    else:
        # the topology is accepted; opening then fails here (a simulated cluster has no firmware toolchain),
        # as one line that names the device and the torch backend
        assert out["cache"].endswith("target-pcie0")
        assert "\n" not in out["error"] and out["error"].startswith(f"cannot open Tenstorrent device {device}: ")
        assert out["error"].endswith("use --backend torch to run on the CPU")


@pytest.fixture(scope="module")
def simulated_n150():
    # bfloat8_b tiles need tt-metal's cluster (tile sizes come from it): a simulated one will do
    saved = os.environ.get(MOCK_ENV)
    os.environ[MOCK_ENV] = str(DATA / "wormhole_N150.yaml")
    yield
    if saved is None:
        del os.environ[MOCK_ENV]
    else:
        os.environ[MOCK_ENV] = saved


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=200, max_position_embeddings=64, tie_word_embeddings=False)
    directory = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("n_devices", [1, 2])
def test_weights_convert_to_tiles_and_back(simulated_n150, checkpoint, n_devices):
    config, hf = read_config(checkpoint), read_hf_weights(checkpoint)
    weights = host_weights(config, hf, n_devices)
    assert weights["lm_head"].tensor.shape == (1, 1, 128, 256 if n_devices == 2 else 224)  # vocab 200 in tiles
    assert weights["layers.0.wqkv"].tensor.shape == (1, 1, 128, 384)  # 2 q + 2 k + 2 v heads of 64
    for name, weight in weights.items():
        source = weight.tensor.to(torch.bfloat16)
        layout = ttnn.TILE_LAYOUT if weight.matrix else ttnn.ROW_MAJOR_LAYOUT
        tiled = ttnn.from_torch(source, dtype=ttnn.bfloat16, layout=layout)
        assert tiled.layout == layout and tuple(tiled.shape) == tuple(source.shape), name
        assert torch.equal(ttnn.to_torch(tiled), source), name  # bf16 checkpoint: exact
        if weight.matrix and source.shape[-2] > 1:
            block = ttnn.to_torch(ttnn.from_torch(source, dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT)).float()
            assert torch.equal(block, round_bfp8(source.float())), name  # the stand-in's bfloat8_b is ttnn's
            groups = source.float().reshape(-1, 16)
            error = (block.reshape(-1, 16) - groups).abs().amax(1) / groups.abs().amax(1).clamp(min=1e-30)
            assert error.max() <= 1 / 64, name  # 7-bit mantissas under a shared exponent



def test_the_runners_inputs_and_logits_convert_with_the_real_ttnn(simulated_n150, checkpoint):
    # the model is built on the stand-in, then its host-side conversions run through ttnn itself (no device)
    model = TtModel(Standin(), Device(), 1, read_config(checkpoint), read_hf_weights(checkpoint), "bfloat16", 1, 64)
    model.ttnn, model.device = ttnn, None
    host = model.host_inputs(torch.arange(100, 132, dtype=torch.int32), 32)
    converted = model.device_inputs(host)
    assert torch.equal(ttnn.to_torch(converted["ids"]).long(), host["ids"].long())
    for name in ("cos", "sin", "mask"):
        assert converted[name].layout == ttnn.TILE_LAYOUT
        assert torch.equal(ttnn.to_torch(converted[name]).float(), host[name].to(torch.bfloat16).float()), name
    logits = torch.randn(1, 1, 32, model.vocab_padded).to(torch.bfloat16)
    got = model.logits_to_host(ttnn.from_torch(logits, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT), slice(3, 5))
    assert torch.equal(got, logits[0, 0, 3:5, :200].float())
