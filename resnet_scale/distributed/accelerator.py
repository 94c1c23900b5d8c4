"""``build_accelerator(cfg)``: the one place that turns the config into an ``Accelerator``.

Launched with ``accelerate launch`` or ``torchrun``, Accelerate reads the process group from the
environment, so the same call serves one process and many (DDP over NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator

from resnet_scale.config import Config, ConfigError


def resolve_device(requested: str) -> str:
    """'cpu' or 'cuda' after resolving 'auto'; asking for a GPU that is not there is an error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    return requested


def build_accelerator(cfg: Config) -> Accelerator:
    device = resolve_device(cfg.train.device)
    if device == "cpu":
        # Accelerate imports DeepSpeed (when installed) to unwrap models; tell DeepSpeed the
        # accelerator up front instead of letting it warn that it found no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return Accelerator(cpu=device == "cpu")
