"""Optimizer and learning-rate schedule, both counted in optimizer steps."""

from __future__ import annotations

import math

import torch
from torch import nn

from resnet_scale.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: not on BatchNorm parameters or biases
    (decaying BN's scale fights the normalisation; Goyal et al. 2017, §5.1 "no bias decay")."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase) or isinstance(module, nn.GroupNorm)
            (no_decay if is_norm or name == "bias" else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum; ``lr`` is the peak rate, reached after warmup.

    The fused kernel (one per device and dtype) takes a ``found_inf`` flag on the device and then
    leaves parameters and momentum untouched: how a step with non-finite gradients is withheld without
    the host reading the flag (``step.apply_update``; fp16's GradScaler passes its own flag the same way)."""
    return torch.optim.SGD(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True
    )


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate before optimizer step ``step`` (0-based).

    ``cosine``: linear warmup from ~0, then half a cosine to 0 (Loshchilov & Hutter 2017).
    ``onecycle``: linear up over the warmup, linear down to 0 at the end (Smith 2018).
    ``constant``: linear warmup, then 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}; valid: cosine, onecycle, constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule. Stepped once per training step by the trainer, a step whose update was
    withheld included (whether it was is a device flag, not read per step), and not passed through
    ``accelerator.prepare``, which would step it once per process."""
    warmup = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps=total_steps, warmup_steps=warmup, schedule=cfg.schedule),
    )
