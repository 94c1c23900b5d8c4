"""How much host memory is left, so that data is checked against it before it is allocated
(``imageset.check_host_memory``): an absurd size (10^11 synthetic images, images of 100,000
pixels a side) is then one DataError line that gives the bytes needed and the bytes available,
instead of an allocator's traceback -- or a machine that swaps itself to a halt.

Imports nothing of the package (``imageset`` imports it).
"""

from __future__ import annotations

import os
from pathlib import Path


def _meminfo_bytes(*keys: str) -> int | None:
    """The sum of ``keys`` of /proc/meminfo (kB there) in bytes; None where it cannot be read."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return sum(int(fields[k].split()[0]) * 1024 for k in keys)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _cgroup_left_bytes() -> int | None:
    """What the memory limit of this process's cgroup (a container's) still leaves; None without one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" / a v1 "no limit" of ~2^63
            return max(0, int(limit) - usage)
    return None


def available_memory_bytes() -> int | None:
    """Host memory a new allocation can still get: MemAvailable plus free swap, lowered to what the
    cgroup limit leaves; the free physical pages where /proc is missing; None if nothing says."""
    free = _meminfo_bytes("MemAvailable", "SwapFree")
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    left = _cgroup_left_bytes()
    return free if left is None else min(free, left)


def format_size(n: float) -> str:
    """Bytes in binary units, 3 significant figures (1.50 TiB, 97.5 MiB)."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}" if v >= 10 else f"{v:.2f} {unit}"
    return f"{int(n)} B"
