"""The ttnn backend on Tenstorrent's Wormhole simulator (ttsim), built from ../shared/ttsim by
scripts/setup_ttsim.sh: the project's device code finds one simulated chip and two as an n300's 1x2 mesh, and
`specpipe launch` on a simulator without tt-metal's SFPI compiler stops in seconds with one line.

Needs ttnn (Python 3.10/3.12: scripts/setup_ttnn_env.sh), g++ with C++20 and the ttsim source; skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.workers.backends.test_ttnn_device import launch_without_a_chip
from workers.backends.ttnn_device import MOCK_ENV, SIMULATOR_ENV, check_sfpi, ttnn_package_dir
from workers.errors import DeviceError

ttnn = pytest.importorskip("ttnn", reason="needs ttnn (Python 3.10/3.12; scripts/setup_ttnn_env.sh)")
pytestmark = pytest.mark.ttnn

REPO = Path(__file__).resolve().parents[3]
SOURCE = REPO.parent / "shared" / "ttsim"

# What a worker does before loading its model, through the project's device code, reported as JSON in a file
# (tt-metal's C++ logger shares stdout with it).
PROBE = """
import json, os, sys
from workers.backends.ttnn_device import (check_chips_present, check_topology, count_chips, device_kind,
                                          import_ttnn, isolate_process, open_device, parse_device)
from workers.errors import DeviceError
device = parse_device(sys.argv[1], "target")
out = {"kind": device_kind()}
try:
    check_chips_present(device)
    isolate_process(device, "target")
    out["slow_dispatch"] = os.environ.get("TT_METAL_SLOW_DISPATCH_MODE")
    ttnn = import_ttnn()
    chips = count_chips(ttnn)
    out["chips"] = [chips.total, chips.pcie]
    check_topology(device, chips)
    opened = open_device(ttnn, device, trace_region_size=1 << 20)
    out["opened"] = opened.n_devices
    opened.close()
except DeviceError as error:
    out["error"] = str(error)
with open(sys.argv[2], "w") as result:
    json.dump(out, result)
"""


def sfpi_missing() -> str | None:
    """The preflight's line when this host lacks the SFPI compiler, else None."""
    try:
        check_sfpi(ttnn_package_dir())
    except DeviceError as error:
        return str(error)
    return None


@pytest.fixture(scope="session")
def simulators(tmp_path_factory) -> Path:
    """DIR/wh (one chip) and DIR/wh_x2 (two), each libttsim.so beside soc_descriptor.yaml."""
    if not list(SOURCE.glob("ttsim-*-src.tar.gz")):
        pytest.skip(f"no ttsim source (ttsim-*-src.tar.gz) in {SOURCE}")
    if shutil.which("g++") is None:
        pytest.skip("building ttsim needs g++ (C++20)")
    directory = tmp_path_factory.mktemp("ttsim")
    result = subprocess.run(["bash", str(REPO / "scripts" / "setup_ttsim.sh"), str(directory)],
                            env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"export {SIMULATOR_ENV}={directory}/wh/libttsim.so TT_METAL_SLOW_DISPATCH_MODE=1" in result.stdout
    assert f"export {SIMULATOR_ENV}={directory}/wh_x2/libttsim.so TT_METAL_SLOW_DISPATCH_MODE=1" in result.stdout
    return directory


def simulated_env(simulators: Path, build: str, tmp_path: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != MOCK_ENV}
    return dict(env, **{SIMULATOR_ENV: str(simulators / build / "libttsim.so")}, PYTHONPATH=str(REPO),
                TT_METAL_CACHE=str(tmp_path / "cache"))


def test_setup_lays_out_each_simulator_and_keeps_a_finished_build(simulators):
    soc = ttnn_package_dir() / "tt_metal" / "soc_descriptors" / "wormhole_b0_80_arch.yaml"
    for build in ("wh", "wh_x2"):
        assert (simulators / build / "libttsim.so").stat().st_size > 0
        assert (simulators / build / "soc_descriptor.yaml").read_text() == soc.read_text()
    began = time.perf_counter()
    again = subprocess.run(["bash", str(REPO / "scripts" / "setup_ttsim.sh"), str(simulators)],
                           env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already built" in again.stderr, again.stderr
    assert time.perf_counter() - began < 10


@pytest.mark.parametrize("build, device, chips, error", [
    ("wh", "tt:0", [1, 1], None),  # an n150
    ("wh", "tt:0/1x2", [1, 1], "mesh 1x2 needs 2 chips but PCIe id(s) [0] reach 1 (1 over PCIe)"),
    ("wh_x2", "tt:0/1x2", [2, 1], None),  # an n300: the second chip over Ethernet, the mesh a large target takes
])
def test_the_device_code_finds_the_simulated_chips(simulators, tmp_path, build, device, chips, error):
    result_file = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-c", PROBE, device, str(result_file)], cwd=tmp_path,
                            env=simulated_env(simulators, build, tmp_path), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result_file.exists(), (result.stdout + result.stderr)[-3000:]
    out = json.loads(result_file.read_text())
    assert out["kind"] == f"simulator ({simulators / build / 'libttsim.so'})"
    assert out["slow_dispatch"] == "1" and out["chips"] == chips, out
    if error:
        assert out["error"].startswith(error), out
    elif sfpi_missing():
        # the topology is accepted; opening then needs the firmware toolchain, and says so in one line
        assert "\n" not in out["error"], out
        assert out["error"].startswith(f"cannot open Tenstorrent device {device}: sfpi not found at "), out
    else:
        assert out["opened"] == (2 if device.endswith("1x2") else 1), out


@pytest.mark.slow
def test_launch_on_the_simulator_without_sfpi_fails_in_seconds_with_one_line_and_no_process_left(
        simulators, tmp_path):
    if not sfpi_missing():
        pytest.skip("this host has tt-metal's SFPI compiler: the simulator would run the model")
    env = {SIMULATOR_ENV: str(simulators / "wh" / "libttsim.so"), "PYTHONPATH": str(REPO)}
    result, elapsed, left = launch_without_a_chip(env, tmp_path, "--target-device", "tt:0")
    assert result.returncode == 2 and elapsed < 20, (elapsed, result.stderr)  # refused before any worker starts
    assert result.stderr.strip().splitlines() == [f"specpipe: error: --target-device: {sfpi_missing()}"]
    assert "runtime/sfpi" in result.stderr and "/opt/tenstorrent/sfpi" in result.stderr
    assert left == []
