"""Choosing and opening a Tenstorrent device, without ttnn: device names, the fast no-chip check, process
isolation, topology rules (on the stand-in), the simulator's set-up checks, the SFPI compiler check, and
`specpipe launch --backend ttnn` on a host without a chip."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runtime.preflight import check_device
from tests.workers.model.ttnn_standin import Standin
from workers.backends import ttnn_device
from workers.backends.ttnn_device import (
    MOCK_ENV,
    SFPI_COMPILER,
    SIMULATOR_ENV,
    TtDevice,
    check_chips_present,
    check_sfpi,
    device_configured,
    device_kind,
    import_ttnn,
    isolate_process,
    open_device,
    parse_device,
    pcie_chips,
)
from workers.errors import DeviceError

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[3]


def ttnn_importable() -> bool:
    try:
        import ttnn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name, role, expected", [
    ("cpu", "target", TtDevice((0,))),  # launch's default: the target takes chip 0 ...
    ("cpu", "draft", None),  # ... and the draft stays on torch
    ("tt", "draft", TtDevice((0,))),
    ("tt:2", "target", TtDevice((2,))),
    ("tt:0/1x2", "target", TtDevice((0,), (1, 2))),
    ("tt:0,1,2,3/1x8", "target", TtDevice((0, 1, 2, 3), (1, 8))),
    ("tt:1/1x1", "target", TtDevice((1,))),
])
def test_device_names(name, role, expected):
    assert parse_device(name, role) == expected


@pytest.mark.parametrize("name, message", [
    ("cuda:0", "not a Tenstorrent device"), ("tt:x", "not a Tenstorrent device"), ("tt:0,0/1x2", "twice"),
    ("tt:0,1", "no mesh shape"), ("tt:0/0x2", "at least one row"),
])
def test_bad_device_names_say_how_to_write_one(name, message):
    with pytest.raises(DeviceError, match=message) as error:
        parse_device(name, "target")
    assert "--backend torch" in str(error.value) or "tt:" in str(error.value)


def test_no_chip_fails_fast_naming_the_device_and_the_torch_backend(tmp_path):
    began = time.perf_counter()
    with pytest.raises(DeviceError) as error:
        check_chips_present(TtDevice((0,)), env={}, dev_dir=str(tmp_path / "absent"))
    assert time.perf_counter() - began < 0.1
    assert str(error.value).startswith("no Tenstorrent chip found (device id 0)")
    assert "--backend torch" in str(error.value)


def test_chips_are_found_by_pcie_id_and_visible_devices(tmp_path):
    for chip in ("0", "1", "3"):
        (tmp_path / chip).touch()
    assert pcie_chips(str(tmp_path)) == [0, 1, 3]
    check_chips_present(TtDevice((3,)), env={}, dev_dir=str(tmp_path))
    check_chips_present(TtDevice((0, 1), (1, 4)), env={}, dev_dir=str(tmp_path))
    with pytest.raises(DeviceError, match=r"PCIe id 2 .*this host has PCIe id\(s\) \[0, 1, 3\]"):
        check_chips_present(TtDevice((2,)), env={}, dev_dir=str(tmp_path))
    with pytest.raises(DeviceError, match=r"PCIe id 1 .*\[3\]"):  # the user hid it
        check_chips_present(TtDevice((1,)), env={"TT_VISIBLE_DEVICES": "3"}, dev_dir=str(tmp_path))
    # on a simulated cluster ttnn enumerates; /dev is not consulted
    check_chips_present(TtDevice((0,)), env={MOCK_ENV: "x.yaml"}, dev_dir=str(tmp_path / "absent"))


def simulator(directory: Path, soc: bool = True) -> dict[str, str]:
    """A simulator laid out as scripts/setup_ttsim.sh does (an empty stand-in library); its environment."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "libttsim.so").touch()
    if soc:
        (directory / "soc_descriptor.yaml").touch()
    return {SIMULATOR_ENV: str(directory / "libttsim.so")}


def test_device_kind_says_silicon_or_which_simulator():
    assert device_kind({}) == "silicon"
    assert device_kind({SIMULATOR_ENV: "  "}) == "silicon"
    assert device_kind({SIMULATOR_ENV: "/sim/wh/libttsim.so"}) == "simulator (/sim/wh/libttsim.so)"
    assert device_kind({MOCK_ENV: "n150.yaml"}) == "mock cluster (n150.yaml)"


def test_a_configured_simulator_stands_in_for_a_chip(tmp_path):
    absent = str(tmp_path / "no-dev")
    env = simulator(tmp_path / "wh_x2")
    assert device_configured(env, absent) and not device_configured({}, absent)
    check_chips_present(TtDevice((0,)), env=env, dev_dir=absent)  # /dev/tenstorrent is not consulted
    check_chips_present(TtDevice((0,), (1, 2)), env=env, dev_dir=absent)  # the two-chip build as an n300
    with pytest.raises(DeviceError, match=r"^device tt:1 on the simulator .*one PCIe chip, id 0; use tt:0"):
        check_chips_present(TtDevice((1,)), env=env, dev_dir=absent)


def test_a_missing_simulator_or_soc_descriptor_says_what_to_do(tmp_path):
    with pytest.raises(DeviceError, match=r"TT_METAL_SIMULATOR=.*libttsim.so: no such file; build one with "
                                          r"scripts/setup_ttsim.sh, or unset TT_METAL_SIMULATOR"):
        check_chips_present(TtDevice(), env={SIMULATOR_ENV: str(tmp_path / "libttsim.so")})
    env = simulator(tmp_path / "wh", soc=False)
    with pytest.raises(DeviceError) as error:
        check_chips_present(TtDevice(), env=env)
    message = str(error.value)
    assert f"{tmp_path / 'wh' / 'soc_descriptor.yaml'} is missing" in message
    assert "copy ttnn/tt_metal/soc_descriptors/wormhole_b0_80_arch.yaml from the installed ttnn" in message


def test_a_simulated_worker_runs_in_slow_dispatch(tmp_path):
    env = {**simulator(tmp_path / "wh"), "TT_METAL_SLOW_DISPATCH_MODE": "0"}
    isolate_process(TtDevice((0,), (1, 2)), "target", env)
    assert env["TT_METAL_SLOW_DISPATCH_MODE"] == "1"  # the only mode the simulator has
    assert "TT_VISIBLE_DEVICES" not in env  # not on PCIe
    chip: dict[str, str] = {}
    isolate_process(TtDevice(), "target", chip)
    assert "TT_METAL_SLOW_DISPATCH_MODE" not in chip and chip["TT_VISIBLE_DEVICES"] == "0"


def fake_ttnn(directory: Path) -> Path:
    (directory / "tt_metal").mkdir(parents=True)
    (directory / "tt_metal" / "sfpi-version").write_text("# sfpi release 7.89.0\nsfpi_version='7.89.0'\n")
    return directory


def install_compiler(root: Path) -> None:
    (root / SFPI_COMPILER).parent.mkdir(parents=True)
    (root / SFPI_COMPILER).touch()


def test_a_missing_sfpi_compiler_is_one_line_naming_where_tt_metal_looks(tmp_path):
    ttnn_dir, system = fake_ttnn(tmp_path / "site-packages" / "ttnn"), tmp_path / "opt" / "sfpi"
    with pytest.raises(DeviceError) as error:
        check_sfpi(ttnn_dir, env={}, system_root=str(system))
    message = str(error.value)
    assert "\n" not in message and message.startswith("tt-metal's SFPI compiler is missing: no ")
    assert f"{ttnn_dir / 'runtime' / 'sfpi'} or {system}" in message and "riscv-tt-elf-g++" in message
    assert f"install sfpi 7.89.0 (github.com/tenstorrent/sfpi) at {system}" in message
    assert message.endswith("use --backend torch to run on the CPU")
    check_sfpi(None, env={}, system_root=str(system))  # no ttnn: the worker says how to install it
    check_sfpi(ttnn_dir, env={MOCK_ENV: "n150.yaml"}, system_root=str(system))  # a mock cluster opens nothing


@pytest.mark.parametrize("where", ["ttnn", "system", "runtime root"])
def test_an_sfpi_compiler_where_tt_metal_looks_is_accepted(tmp_path, where):
    ttnn_dir, system, root = fake_ttnn(tmp_path / "ttnn"), tmp_path / "opt" / "sfpi", tmp_path / "tt-metal"
    install_compiler({"ttnn": ttnn_dir / "runtime" / "sfpi", "system": system,
                      "runtime root": root / "runtime" / "sfpi"}[where])
    check_sfpi(ttnn_dir, env={"TT_METAL_RUNTIME_ROOT": str(root)}, system_root=str(system))


def test_preflight_refuses_a_simulator_without_sfpi_naming_the_option(tmp_path, monkeypatch):
    for name in ("TT_METAL_RUNTIME_ROOT", "TT_METAL_HOME", MOCK_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(SIMULATOR_ENV, simulator(tmp_path / "wh")[SIMULATOR_ENV])
    monkeypatch.setattr(ttnn_device, "ttnn_package_dir", lambda: fake_ttnn(tmp_path / "ttnn"))
    monkeypatch.setattr(ttnn_device, "SYSTEM_SFPI", str(tmp_path / "opt" / "sfpi"))
    with pytest.raises(ValueError, match=r"^--target-device: tt-metal's SFPI compiler is missing"):
        check_device("ttnn", "tt:0", "--target-device")
    check_device("ttnn", "cpu", "--draft-device")  # a draft left on torch needs no compiler


def test_each_worker_sees_only_its_chips_and_has_its_own_kernel_cache():
    draft_env, target_env = {"TT_VISIBLE_DEVICES": "0,1"}, {}
    isolate_process(TtDevice((1,)), "draft", draft_env)
    isolate_process(TtDevice((0,)), "target", target_env)
    assert draft_env["TT_VISIBLE_DEVICES"] == "1" and target_env["TT_VISIBLE_DEVICES"] == "0"
    assert draft_env["TT_METAL_CACHE"] != target_env["TT_METAL_CACHE"]
    user = {"TT_METAL_CACHE": "/mine", MOCK_ENV: "n300.yaml"}
    isolate_process(TtDevice((0,), (1, 2)), "target", user)
    assert user["TT_METAL_CACHE"] == "/mine" and "TT_VISIBLE_DEVICES" not in user  # ignored when simulated


@pytest.mark.skipif(ttnn_importable(), reason="ttnn is installed here")
def test_missing_ttnn_says_how_to_install_it():
    with pytest.raises(DeviceError, match=r"pip install 'specpipe\[ttnn\]'") as error:
        import_ttnn()
    if sys.version_info[:2] not in ((3, 10), (3, 12)):
        assert "3.10 and 3.12" in str(error.value)


def test_topology_rules_and_closing():
    with pytest.raises(DeviceError, match=r"no Tenstorrent chip found \(device id 0\)"):
        open_device(Standin(chips=0), TtDevice(), trace_region_size=0)
    with pytest.raises(DeviceError, match="mesh 1x4 needs 4 chips .* reach 2"):  # one n300 card
        open_device(Standin(chips=2), TtDevice((0,), (1, 4)), trace_region_size=0)
    order: list[str] = []
    n300 = Standin(chips=2)
    opened = open_device(n300, TtDevice((0,), (1, 2)), trace_region_size=1 << 20)
    opened.on_close += [lambda: order.append("buffers"), lambda: order.append("traces")]
    assert opened.n_devices == 2 and opened.handle.n_devices == 2 and n300.fabric == "FABRIC_1D"
    opened.close()
    opened.close()  # at exit too: closing twice is a no-op
    assert opened.handle.closed and order == ["traces", "buffers"] and n300.fabric == "DISABLED"


def test_open_failure_is_one_line_naming_the_device():
    class Busy(Standin):
        def __init__(self) -> None:
            super().__init__(chips=1)
            self.open_device = self._busy

        def _busy(self, **kwargs: object) -> None:
            raise RuntimeError("TT_FATAL @ device.cpp:1: open\ninfo:\nDevice 0 is in use\nbacktrace:\n --- x")

    with pytest.raises(DeviceError, match=r"^cannot open Tenstorrent device tt:0: Device 0 is in use; use --backend torch"):
        open_device(Busy(), TtDevice(), trace_region_size=0)


def launch_without_a_chip(env_extra: dict[str, str], tmp_path: Path,
                          *options: str) -> tuple[subprocess.CompletedProcess, float, list[int]]:
    """Runs `specpipe launch --backend ttnn [options]` in its own session; returns it, its wall time and what it
    left."""
    env = dict(os.environ, **env_extra)
    began = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "launch", "--backend", "ttnn", *options, "--prompt", "def f(x):",
         "--max-new-tokens", "4"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    stdout, stderr = process.communicate(timeout=120)
    elapsed = time.perf_counter() - began
    time.sleep(0.5)
    left = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _session(int(pid)) == process.pid]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), elapsed, left


def _session(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[4])  # fields after the command: state ppid pgrp session


@pytest.mark.slow
@pytest.mark.skipif(device_configured(), reason="this host has a Tenstorrent chip, or TT_METAL_SIMULATOR names one")
def test_launch_without_a_chip_fails_in_seconds_with_one_line_and_no_process_left(tmp_path):
    result, elapsed, left = launch_without_a_chip({}, tmp_path)
    assert result.returncode != 0 and elapsed < 20, (elapsed, result.stderr)  # refused before any worker starts
    last = result.stderr.strip().splitlines()[-1]
    assert "no Tenstorrent chip found (device id 0)" in last and "--backend torch" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert left == []


@pytest.mark.slow
@pytest.mark.skipif(ttnn_importable(), reason="ttnn is installed here")
def test_launch_without_ttnn_fails_with_one_line_on_installing_it(tmp_path):
    # a simulated cluster gets past the chip check, so the missing package is what is reported
    result, elapsed, left = launch_without_a_chip({MOCK_ENV: str(DATA / "wormhole_N150.yaml")}, tmp_path)
    assert result.returncode != 0 and elapsed < 60
    last = result.stderr.strip().splitlines()[-1]
    assert "needs the ttnn package" in last and "pip install 'specpipe[ttnn]'" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert left == []
