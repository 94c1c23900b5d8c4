"""What produced a run: package versions, the git commit, the CPU and GPU model. Saved in every
run's ``config.json`` and sent to the trackers, so runs can be compared honestly."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, when there is one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


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
    }
    return info
