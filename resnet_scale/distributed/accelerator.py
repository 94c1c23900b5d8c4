"""``build_accelerator(cfg)``: the one place that turns the config into an ``Accelerator``.

Launched with ``accelerate launch`` or ``torchrun``, Accelerate reads the process group from the
environment, so the same call serves one process and many (DDP over NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator

from resnet_scale.config import Config, ConfigError
from resnet_scale.memory.settings import MemorySettings


def resolve_device(requested: str) -> str:
    """'cpu' or 'cuda' after resolving 'auto'; asking for a GPU that is not there is an error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    return requested


def world_size_from_env() -> int:
    """Processes in this job as the launcher (torchrun, accelerate launch, SLURM via torchrun)
    announced them, known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(cfg: Config, memory: MemorySettings | None = None) -> Accelerator:
    """The Accelerator for this run: device, autocast precision and gradient accumulation
    (micro-batches per optimizer step) come from the resolved memory settings."""
    device = resolve_device(cfg.train.device)
    if device == "cpu":
        # Accelerate imports DeepSpeed (when installed) to unwrap models; tell DeepSpeed the
        # accelerator up front instead of letting it warn that it found no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision=memory.mixed_precision if memory else "no",
        gradient_accumulation_steps=memory.accumulation_steps if memory else 1,
    )
    if memory and accelerator.num_processes != world_size_from_env():
        raise ConfigError(
            f"the launcher announced {world_size_from_env()} processes but Accelerate sees "
            f"{accelerator.num_processes}; the batch split would be wrong. Launch with torchrun or accelerate launch."
        )
    return accelerator
