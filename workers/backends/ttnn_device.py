"""Choosing, opening and closing a Tenstorrent device (one chip, or a mesh of chips) for one worker process.

A worker names its chips with `--device tt:<PCIe ids>[/<rows>x<cols>]`:

    tt, tt:0        one chip, PCIe id 0 (n150; chip 0 of an n300)
    tt:2            one chip, PCIe id 2 (a T3000 has PCIe ids 0-3, one per n300 card)
    tt:0/1x2        both chips of one n300 card as a 1x2 mesh, the model tensor-parallel over them
    tt:0,1,2,3/1x8  a whole T3000 (four n300 cards, eight chips) as one 1x8 mesh

Each process sees only its own chips (tt-metal's advice for one process per device): the worker
sets TT_VISIBLE_DEVICES to its PCIe ids before ttnn is imported, gets a TT_METAL_CACHE of its own,
and opens device 0 of what it sees, or a mesh over all of it.

With TT_METAL_SIMULATOR naming Tenstorrent's simulator library (ttsim; scripts/setup_ttsim.sh builds it),
tt-metal loads it in place of the PCIe driver: `tt:0` is its one chip (or its first, for `tt:0/1x2` on the
two-chip build), and the worker runs in slow dispatch, the only mode the simulator supports.

The second chip of an n300 has no PCIe link of its own, so it cannot be given to a second process: on an
n150 or an n300 only one worker can hold the card (the other runs on torch), and a T3000 can host a draft
and a target on separate cards.

ttnn is imported only here and only when a worker asks for this backend, so the torch path needs
no ttnn installed.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

from workers.errors import DeviceError

DEV_DIR = "/dev/tenstorrent"  # the kernel driver's character devices, one per PCIe chip: /dev/tenstorrent/<id>
MOCK_ENV = "TT_METAL_MOCK_CLUSTER_DESC_PATH"  # tt-metal's simulated cluster (a cluster descriptor YAML)
SIMULATOR_ENV = "TT_METAL_SIMULATOR"  # a full-system simulator library (ttsim's libttsim.so) loaded instead of a chip
SOC_DESCRIPTOR = "soc_descriptor.yaml"  # tt-metal reads the simulated chip's layout from beside the library
SOC_SOURCE = "ttnn/tt_metal/soc_descriptors/wormhole_b0_80_arch.yaml"  # in the installed ttnn package
SYSTEM_SFPI = "/opt/tenstorrent/sfpi"  # where a machine set up for tt-metal has its SFPI toolchain
SFPI_COMPILER = "compiler/bin/riscv-tt-elf-g++"  # builds the chip's firmware and every kernel at run time
WHEEL_PYTHONS = ((3, 10), (3, 12))  # the only CPython versions ttnn publishes wheels for
TORCH_HINT = "use --backend torch to run on the CPU"
DEVICE_SYNTAX = "tt, tt:N (PCIe id N), tt:N/1x2 (the two chips of an n300) or tt:0,1,2,3/1x8 (a T3000)"
_SPEC = re.compile(r"^tt(?::(?P<ids>\d+(?:,\d+)*))?(?:/(?P<rows>\d+)x(?P<cols>\d+))?$")


@dataclass(frozen=True)
class TtDevice:
    """What one worker asks for: the PCIe chips it owns and the mesh laid over them (None = one chip)."""

    pcie_ids: tuple[int, ...] = (0,)
    mesh_shape: tuple[int, int] | None = None

    @property
    def n_chips(self) -> int:
        return 1 if self.mesh_shape is None else self.mesh_shape[0] * self.mesh_shape[1]

    def __str__(self) -> str:
        ids = ",".join(map(str, self.pcie_ids))
        return f"tt:{ids}" + (f"/{self.mesh_shape[0]}x{self.mesh_shape[1]}" if self.mesh_shape else "")


def parse_device(name: str, role: str) -> TtDevice | None:
    """`--device` for `--backend ttnn`. None: the worker stays on torch on the CPU.

    `specpipe launch` passes `cpu` for a device the user did not name; under `--backend ttnn` the
    target then takes chip 0 and the draft stays on the CPU, since on an n150 or n300 only one
    process can own the card.
    """
    if name == "cpu":
        return TtDevice() if role == "target" else None
    match = _SPEC.match(name.strip())
    if not match:
        raise DeviceError(f"device {name!r} is not a Tenstorrent device; use {DEVICE_SYNTAX}, or {TORCH_HINT}")
    ids = tuple(int(i) for i in match["ids"].split(",")) if match["ids"] else (0,)
    if len(set(ids)) != len(ids):
        raise DeviceError(f"device {name!r} names a PCIe id twice")
    if match["rows"] is None:
        if len(ids) > 1:
            raise DeviceError(f"device {name!r} names {len(ids)} chips but no mesh shape; add one, e.g. tt:{match['ids']}/1x{2 * len(ids)}")
        return TtDevice(ids)
    rows, cols = int(match["rows"]), int(match["cols"])
    if rows < 1 or cols < 1:
        raise DeviceError(f"mesh shape {rows}x{cols} in {name!r} must have at least one row and column")
    if rows * cols == 1:
        return TtDevice(ids)
    return TtDevice(ids, (rows, cols))


def pcie_chips(dev_dir: str = DEV_DIR) -> list[int]:
    """PCIe ids of the chips the kernel driver exposes on this host (no ttnn needed, microseconds)."""
    try:
        return sorted(int(entry.name) for entry in Path(dev_dir).iterdir() if entry.name.isdigit())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def simulator_library(env: Mapping[str, str] = os.environ) -> Path | None:
    """The simulator library TT_METAL_SIMULATOR names; None: tt-metal drives chips over PCIe."""
    value = env.get(SIMULATOR_ENV, "").strip()
    return Path(value) if value else None


def device_kind(env: Mapping[str, str] = os.environ) -> str:
    """What `--backend ttnn` runs on in this environment, for the worker's startup line:
    "silicon", "simulator (<library>)" or "mock cluster (<descriptor>)"."""
    library = simulator_library(env)
    if library is not None:
        return f"simulator ({library})"
    if env.get(MOCK_ENV):
        return f"mock cluster ({env[MOCK_ENV]})"
    return "silicon"


def device_configured(env: Mapping[str, str] = os.environ, dev_dir: str = DEV_DIR) -> bool:
    """Whether there is a device to run on: a chip the driver lists, or a simulator named by TT_METAL_SIMULATOR."""
    return simulator_library(env) is not None or bool(pcie_chips(dev_dir))


def check_simulator(device: TtDevice, library: Path) -> None:
    """The simulator library and the SOC descriptor tt-metal reads beside it, and a device it simulates."""
    hint = f"build one with scripts/setup_ttsim.sh, or unset {SIMULATOR_ENV} to use a chip"
    if not library.is_file():
        raise DeviceError(f"{SIMULATOR_ENV}={library}: no such file; {hint}")
    soc = library.parent / SOC_DESCRIPTOR
    if not soc.is_file():
        raise DeviceError(f"{SIMULATOR_ENV}={library}: {soc} is missing (tt-metal reads the simulated chip's layout "
                          f"there); copy {SOC_SOURCE} from the installed ttnn to it, or {hint}")
    if device.pcie_ids != (0,):
        raise DeviceError(f"device {device} on the simulator ({SIMULATOR_ENV}={library}): the simulator has one PCIe "
                          f"chip, id 0; use tt:0, or tt:0/1x2 with the two-chip build")


def check_chips_present(device: TtDevice, env: Mapping[str, str] = os.environ, dev_dir: str = DEV_DIR) -> None:
    """Fails at once, before ttnn is imported, when a PCIe id the worker asks for is not on this host
    (or, on the simulator, when the simulator is not set up)."""
    library = simulator_library(env)
    if library is not None:
        check_simulator(device, library)
        return
    if env.get(MOCK_ENV):
        return  # a simulated cluster: ttnn's own enumeration decides
    present = pcie_chips(dev_dir)
    visible = env.get("TT_VISIBLE_DEVICES", "").strip()
    if visible:  # the user's restriction, narrowed later to this worker's own ids
        allowed = {int(i) for i in visible.split(",") if i.strip().isdigit()}
        present = [i for i in present if i in allowed]
    missing = [i for i in device.pcie_ids if i not in present]
    if not present:
        raise DeviceError(f"no Tenstorrent chip found (device id {missing[0]}): {dev_dir} lists no device on this "
                          f"host (is the tt-kmd driver loaded?); {TORCH_HINT}")
    if missing:
        raise DeviceError(f"no Tenstorrent chip with PCIe id {missing[0]} (device id {missing[0]}): this host has "
                          f"PCIe id(s) {present}; pick one with --target-device/--draft-device tt:N, or {TORCH_HINT}")


def ttnn_package_dir() -> Path | None:
    """Where the ttnn package is installed, found without importing it; None: not installed."""
    spec = importlib.util.find_spec("ttnn")
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def sfpi_roots(ttnn_dir: Path, env: Mapping[str, str] = os.environ, system_root: str | None = None) -> list[Path]:
    """Where tt-metal looks for its SFPI toolchain: <runtime root>/runtime/sfpi, then /opt/tenstorrent/sfpi.

    The runtime root is the installed ttnn package unless TT_METAL_RUNTIME_ROOT (or a source checkout's
    TT_METAL_HOME) names another."""
    roots = [Path(env[name]) for name in ("TT_METAL_RUNTIME_ROOT", "TT_METAL_HOME") if env.get(name)]
    return [*(root / "runtime" / "sfpi" for root in (*roots, ttnn_dir)), Path(system_root or SYSTEM_SFPI)]


def check_sfpi(ttnn_dir: Path | None, env: Mapping[str, str] = os.environ, system_root: str | None = None) -> None:
    """Refuses, before any worker starts, a host whose tt-metal could not build a kernel: without the SFPI
    compiler opening a device fails deep in tt-metal. Nothing to check without ttnn (the worker says how to
    install it) or on a mock cluster (it opens no device)."""
    if ttnn_dir is None or (env.get(MOCK_ENV) and simulator_library(env) is None):
        return
    roots = sfpi_roots(ttnn_dir, env, system_root)
    if any((root / SFPI_COMPILER).is_file() for root in roots):
        return
    version = sfpi_version(ttnn_dir)
    release = f"sfpi {version}" if version else "the sfpi release this ttnn was built with"
    raise DeviceError(
        f"tt-metal's SFPI compiler is missing: no {SFPI_COMPILER} under {' or '.join(map(str, roots))} "
        f"(tt-metal builds the chip's firmware and kernels with it when a device opens); install {release} "
        f"(github.com/tenstorrent/sfpi) at {roots[-1]}, or {TORCH_HINT}")


def sfpi_version(ttnn_dir: Path) -> str | None:
    """The SFPI release the installed tt-metal was built with (its tt_metal/sfpi-version file)."""
    try:
        text = (ttnn_dir / "tt_metal" / "sfpi-version").read_text()
    except OSError:
        return None
    match = re.search(r"^sfpi_version='([^']+)'", text, re.MULTILINE)
    return match[1] if match else None


def import_ttnn() -> ModuleType:
    """The ttnn module, or a DeviceError that says how to install it."""
    version = sys.version_info[:2]
    try:
        import ttnn  # noqa: PLC0415 (lazy on purpose: the torch backend must not need it)
    except ImportError as error:
        where = "" if version in WHEEL_PYTHONS else (
            f" ttnn publishes wheels only for CPython 3.10 and 3.12, and this is {version[0]}.{version[1]}:"
            " make a 3.10 or 3.12 environment first.")
        raise DeviceError(f"--backend ttnn needs the ttnn package ({error.msg}).{where} "
                          f"Install it with: pip install 'specpipe[ttnn]'; or {TORCH_HINT}") from None
    return ttnn


def isolate_process(device: TtDevice, role: str, env: dict[str, str] | None = None) -> None:
    """Environment for a process that owns `device`; call after `check_chips_present`, before ttnn is imported.

    TT_VISIBLE_DEVICES becomes exactly this worker's PCIe ids (within any set the user gave, already
    checked), so device 0 of this process is the first of them.
    """
    env = os.environ if env is None else env
    if simulator_library(env) is not None:
        env["TT_METAL_SLOW_DISPATCH_MODE"] = "1"  # the simulator has no fast-dispatch path
    elif not env.get(MOCK_ENV):  # tt-metal ignores TT_VISIBLE_DEVICES on a simulated cluster
        env["TT_VISIBLE_DEVICES"] = ",".join(map(str, device.pcie_ids))
    # A kernel cache per worker and chip set: two processes compiling into one cache directory race.
    ids = "-".join(map(str, device.pcie_ids))
    env.setdefault("TT_METAL_CACHE", str(Path.home() / ".cache" / "specpipe" / "tt-metal" / f"{role}-pcie{ids}"))
    env.setdefault("LOGURU_LEVEL", "WARNING")  # ttnn's Python logger prints its whole config at DEBUG on import
    env.setdefault("TT_LOGGER_LEVEL", "ERROR")


@dataclass(frozen=True)
class ChipCount:
    total: int  # chips tt-metal can open (an n300 counts two)
    pcie: int  # of which have a PCIe link to this host


def count_chips(ttnn: Any) -> ChipCount:
    """Chips visible to this process, as tt-metal sees them (real or simulated)."""
    try:
        return ChipCount(int(ttnn.GetNumAvailableDevices()), int(ttnn.GetNumPCIeDevices()))
    except RuntimeError as error:
        if "No chips detected" in str(error):
            return ChipCount(0, 0)
        raise DeviceError(f"tt-metal could not list the chips: {_first_line(error)}; {TORCH_HINT}") from None


def check_topology(device: TtDevice, chips: ChipCount) -> None:
    """The mesh a worker asks for must fit the chips its PCIe ids bring with them."""
    if chips.total == 0:
        raise DeviceError(f"no Tenstorrent chip found (device id {device.pcie_ids[0]}); {TORCH_HINT}")
    if device.mesh_shape is None:
        return
    if device.n_chips > chips.total:
        rows, cols = device.mesh_shape
        raise DeviceError(
            f"mesh {rows}x{cols} needs {device.n_chips} chips but PCIe id(s) {list(device.pcie_ids)} reach "
            f"{chips.total} ({chips.pcie} over PCIe); an n300 card gives 2 chips, a T3000 8 (tt:0,1,2,3/1x8)")


@dataclass
class OpenDevice:
    """A device context owned by this process: one chip or a mesh. Closed exactly once, also at exit."""

    ttnn: Any
    handle: Any
    spec: TtDevice
    n_devices: int
    open_s: float
    on_close: list[Callable[[], None]] = field(default_factory=list)
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for release in reversed(self.on_close):  # traces and buffers go before the device
            release()
        if self.spec.mesh_shape is None:
            self.ttnn.close_device(self.handle)
        else:
            self.ttnn.close_mesh_device(self.handle)
            self.ttnn.set_fabric_config(self.ttnn.FabricConfig.DISABLED)


def open_device(ttnn: Any, device: TtDevice, *, trace_region_size: int, l1_small_size: int = 0) -> OpenDevice:
    """Opens `device` (what TT_VISIBLE_DEVICES left visible to this process) and registers its close at exit."""
    check_topology(device, count_chips(ttnn))
    began = time.perf_counter()
    try:
        if device.mesh_shape is None:
            handle = ttnn.open_device(device_id=0, l1_small_size=l1_small_size, trace_region_size=trace_region_size)
            n_devices = 1
        else:
            ttnn.set_fabric_config(ttnn.FabricConfig.FABRIC_1D)  # the ethernet links all_reduce runs over
            handle = ttnn.open_mesh_device(ttnn.MeshShape(*device.mesh_shape), l1_small_size=l1_small_size,
                                           trace_region_size=trace_region_size)
            n_devices = device.n_chips
    except RuntimeError as error:
        raise DeviceError(f"cannot open Tenstorrent device {device}: {_first_line(error)}; {TORCH_HINT}") from None
    opened = OpenDevice(ttnn, handle, device, n_devices, time.perf_counter() - began)
    atexit.register(opened.close)
    return opened


def _first_line(error: BaseException) -> str:
    # tt-metal's messages are "TT_FATAL @ file:line: condition\ninfo:\n<what happened>\nbacktrace: ..."
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "info:" in lines:
        after = lines[lines.index("info:") + 1 :]
        if after:
            return after[0]
    return lines[0] if lines else type(error).__name__
