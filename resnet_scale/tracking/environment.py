"""What produced a run: package versions, the git commit (of a checkout) or the folder the package
ran from (an installed copy), the CPU and GPU model. Saved in every
run's ``config.json`` and sent to the trackers, so runs can be compared honestly."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def package_dir() -> Path:
    """The folder this package runs from: a checkout's ``resnet_scale/`` or an installed copy."""
    return Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """The commit of the checkout this package runs from; None for an installed copy (a wheel in
    site-packages), even when that lies inside some other git repository (a project's virtual
    environment)."""
    package = package_dir()
    try:
        out = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package.parent:
        return None
    return lines[1]


def environment_info() -> dict[str, Any]:
    """Versions and hardware, saved with the config so runs can be compared honestly."""
    import accelerate
    import torchvision

    from resnet_scale._version import __version__

    info: dict[str, Any] = {
        "resnet_scale": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "package_dir": str(package_dir()),
    }
    return info
