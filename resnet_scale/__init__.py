"""resnet_scale: train ResNets on CIFAR-10 and data like it, and make them fit and go fast.

The API for notebooks and your own training loops (docs/api.md has examples):

* ``Config`` -- the whole run as typed dataclasses; every field is also a ``resnet-scale train``
  flag. ``train(cfg)`` trains as configured and returns the run's summary; it can be called any
  number of times in one process, with any settings.
* ``build_resnet(block, depth, ...)`` -- a ResNet of plain, basic or bottleneck blocks
  (torchvision's names: with ``stem="imagenet"`` its state_dict is torchvision's).
* ``apply_activation_checkpointing(model, policy)``, ``apply_channels_last(model)``,
  ``apply_sync_batchnorm(model, device_type)`` -- memory and distribution transforms, applied to
  a model from outside, in place (resnet_scale's ResNets and torchvision's alike).
* ``estimate_memory(cfg)`` -- predicted peak memory per device, by what holds it;
  ``plan(cfg, "8GiB")`` -- the fastest memory settings that fit a budget, ``apply_plan(cfg, plan)``
  the config to train with; ``estimate_activation_bytes(model, ...)`` -- the planner's activation
  estimate for a model.
* ``measure_saved_activation_bytes(model, batch_size, image_size)`` -- the bytes one training step
  saves for its backward pass, measured on the ``meta`` device (no compute, no memory).

Data flows one way: config -> data -> model -> memory transforms -> accelerator -> training loop
-> run files -> trackers -> report (docs/architecture.md). ``import resnet_scale`` imports nothing
else: each name above is imported when first used, and every optional dependency only where it is
used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from resnet_scale._version import __version__

#: Public name -> the module that defines it (imported on first use).
_API = {
    "Config": "resnet_scale.config",
    "build_resnet": "resnet_scale.models",
    "train": "resnet_scale.train",
    "plan": "resnet_scale.planner",
    "apply_plan": "resnet_scale.planner",
    "estimate_memory": "resnet_scale.planner",
    "estimate_activation_bytes": "resnet_scale.planner",
    "apply_activation_checkpointing": "resnet_scale.memory",
    "apply_channels_last": "resnet_scale.memory",
    "apply_sync_batchnorm": "resnet_scale.distributed.sync_bn",
    "measure_saved_activation_bytes": "resnet_scale.memory",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """Import a public name on first use (``import resnet_scale`` stays light)."""
    if name not in _API:
        raise AttributeError(f"module 'resnet_scale' has no attribute {name!r}")
    module = importlib.import_module(_API[name])
    # ``train`` is the package resnet_scale.train itself, which is callable: ``resnet_scale.train(cfg)``
    # (Python makes ``resnet_scale.train`` the package whenever it is imported; see that package).
    value = module if name == "train" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports these
    # ruff: noqa: F401
    from resnet_scale import train
    from resnet_scale.config import Config
    from resnet_scale.distributed.sync_bn import apply_sync_batchnorm
    from resnet_scale.memory import apply_activation_checkpointing, apply_channels_last, measure_saved_activation_bytes
    from resnet_scale.models import build_resnet
    from resnet_scale.planner import apply_plan, estimate_activation_bytes, estimate_memory, plan
