"""The memory planner: predict the peak memory of a run before launching it, and find the fastest
settings that fit a budget.

* ``estimate.py`` -- ``estimate_memory(cfg)``: bytes per device by what holds them (weights,
  gradients, optimizer states, activations, the input batch, the dataset, workspace).
* ``search.py`` -- ``plan(cfg, "8GiB")`` / ``plan_memory(cfg, budget_bytes)``: an exhaustive search over precision,
  channels_last, micro-batch, checkpointing policy, ZeRO stage and activation compression; ``apply_plan`` and
  ``plan_for_training`` turn the answer into the config a run trains with.
* ``profile.py`` -- the activation and FLOP profiles, measured on the ``meta`` device with the
  real model (``resnet_scale.memory``'s measurement), per residual block;
  ``estimate_activation_bytes(model, micro_batch, image_size, policy=...)`` for any ResNet
  (torchvision's too).
* ``compressed.py`` / ``records.py`` -- what a model with activation compression stores and holds
  while restoring, derived from the same meta-device forwards;
* ``timing.py`` -- the time model (``predicted_step_seconds``); ``dataset.py`` -- the dataset held on
  the device.
* ``units.py`` -- ``parse_bytes("8GiB")`` and ``format_bytes``.
"""

from resnet_scale.planner.estimate import (
    WORKSPACE_FRACTION,
    WORKSPACE_MIN_BYTES,
    MemoryEstimate,
    StateRecipe,
    estimate_memory,
    model_state_bytes,
)
from resnet_scale.planner.profile import estimate_activation_bytes
from resnet_scale.planner.search import Plan, apply_plan, plan, plan_for_training, plan_memory, predicted_step_seconds
from resnet_scale.planner.units import format_bytes, parse_bytes

__all__ = [
    "MemoryEstimate",
    "Plan",
    "StateRecipe",
    "WORKSPACE_FRACTION",
    "WORKSPACE_MIN_BYTES",
    "apply_plan",
    "estimate_activation_bytes",
    "estimate_memory",
    "format_bytes",
    "model_state_bytes",
    "parse_bytes",
    "plan",
    "plan_for_training",
    "plan_memory",
    "predicted_step_seconds",
]
