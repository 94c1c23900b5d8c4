"""Sizes in bytes as users write and read them: ``--max-memory 8GiB`` and ``97.5 MiB``."""

from __future__ import annotations

import math
import re
from typing import Optional

import torch

from resnet_scale.config import ConfigError

MiB, GiB = 2**20, 2**30

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(text: Optional[str]) -> Optional[int]:
    """``"8GiB"`` -> 8 x 2**30, ``"8GB"`` -> 8 x 10**9, ``"512MiB"``, ``"1.5 GiB"``, ``"123456"``
    (bytes); ``"auto"`` -> the free memory of the current CUDA device (``torch.cuda.mem_get_info``);
    None or ``"none"`` -> None. Raises ConfigError (a ValueError) saying what is accepted."""
    if text is None:
        return None
    raw = str(text).strip()
    low = raw.lower()
    if low in ("", "none"):
        return None
    if low == "auto":
        if not torch.cuda.is_available():
            raise ConfigError(
                "--max-memory auto reads the free memory of the CUDA device, but no CUDA GPU is "
                "visible; give a size such as 8GiB."
            )
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", low)
    unit = m.group(2) if m else None
    if m is None or unit not in _UNITS and unit != "":
        hint = ""
        if unit in ("k", "m", "g", "t"):
            u, v = unit.upper(), m.group(1)
            hint = f" ('{u}' is ambiguous: write {v}{u}iB for 2^n or {v}{u}B for 10^n)"
        raise ConfigError(
            f"--max-memory {raw!r} is not a size{hint}; write e.g. 8GiB, 8GB, 512MiB, a number of "
            "bytes, or auto (the GPU's free memory)."
        )
    value = float(m.group(1)) * _UNITS[unit or "b"]
    if not math.isfinite(value) or value > 2**63 - 1:
        raise ConfigError(f"--max-memory {raw[:24]!r}{'...' if len(raw) > 24 else ''} is larger than any "
                          "memory (more than 2^63 bytes); write e.g. 80GiB, or auto.")
    if value < 1:
        raise ConfigError(f"--max-memory {raw!r} must be a positive size, e.g. 8GiB.")
    return int(value)


def format_bytes(n: Optional[float]) -> str:
    """Binary units, 3 significant figures: 8.00 GiB, 97.5 MiB, 512 B."""
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}" if v >= 10 else f"{v:.2f} {unit}"
    return f"{int(n)} B"
