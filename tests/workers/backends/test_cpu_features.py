"""The one CPU-feature probe: x86 "flags" and ARM "Features" lines of /proc/cpuinfo, and this machine's own."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from workers.backends import cpu_features

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512_bf16
vmx flags\t: vnmi preemption_timer
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512_bf16
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp
CPU implementer\t: 0x41
"""


def test_x86_flags_come_from_the_flags_line_alone():
    flags = cpu_features.parse_flags(X86)
    assert flags == {"fpu", "sse", "sse2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16"}
    assert "vnmi" not in flags  # the "vmx flags" line is not the CPU's


def test_arm_flags_come_from_the_features_line():
    assert cpu_features.parse_flags(ARM) == {"fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32",
                                             "atomics", "fphp", "asimdhp"}


def test_no_flags_line_is_no_flags():
    assert cpu_features.parse_flags("processor\t: 0\nmodel name\t: something\n") == frozenset()
    assert cpu_features.parse_flags("") == frozenset()


def test_no_cpuinfo_is_no_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_features, "CPUINFO", str(tmp_path / "absent"))
    assert cpu_features.cpu_flags.__wrapped__() == frozenset()


def test_a_sample_file_is_read(monkeypatch, tmp_path):
    sample = tmp_path / "cpuinfo"
    sample.write_text(ARM)
    monkeypatch.setattr(cpu_features, "CPUINFO", str(sample))
    assert "asimd" in cpu_features.cpu_flags.__wrapped__()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or platform.machine() not in ("x86_64", "AMD64"),
                    reason="an x86 Linux machine's own flags")
def test_this_x86_machine_has_sse2_and_the_key_is_the_sorted_set():
    flags = cpu_features.cpu_flags()
    assert isinstance(flags, frozenset) and "sse2" in flags  # every x86-64 CPU has SSE2
    assert ("avx2" in flags) == ("avx2" in Path("/proc/cpuinfo").read_text().split())
    assert cpu_features.cpu_flags() is flags  # read once
    assert cpu_features.cpu_flags_key() == " ".join(sorted(flags))
