"""The CPU's feature flags, read once from /proc/cpuinfo.

x86 lists them on its "flags" lines, ARM on its "Features" lines; the first such line is taken (every core of
a machine lists the same). Where there is no /proc/cpuinfo (not Linux) the set is empty.
"""

from __future__ import annotations

import functools

CPUINFO = "/proc/cpuinfo"


def parse_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first "flags" (x86) or "Features" (ARM) line of a /proc/cpuinfo text; empty if none."""
    for line in cpuinfo.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (e.g. {"sse2", "avx2", "fma", ...} on x86, {"fp", "asimd", ...} on ARM)."""
    try:
        with open(CPUINFO) as cpuinfo:
            return parse_flags(cpuinfo.read())
    except OSError:
        return frozenset()


def cpu_flags_key() -> str:
    """The flags as one string, sorted so that it names the CPU's features alone (for build cache keys)."""
    return " ".join(sorted(cpu_flags()))
