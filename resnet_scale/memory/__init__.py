"""Memory transforms and measurements, applied to a model from outside (the model knows nothing
of them).

* ``checkpointing.py`` -- ``apply_activation_checkpointing(model, policy, impl=..., offload_to_cpu=...)``
  recomputes runs of residual blocks in the backward pass instead of storing their activations,
  with BatchNorm running statistics updated once per step; ``CHECKPOINT_POLICIES`` names and
  explains the policies (``none``, ``block``, ``stage``, ``sqrt``, ``every:K``) and
  ``segments(model, policy)`` lists the blocks of each segment. The module docstring gives the
  design (segments never cross a stage boundary; state_dict keys never change). Works on
  resnet_scale's and torchvision's ResNets alike.
* ``segments.py`` -- the policies, a ResNet's stages (``stage_names``, else torchvision's
  ``layer1`` ... ``layerN``) and the segments a policy cuts them into.
* ``layout.py`` -- ``apply_channels_last(model)``: NHWC weights for tensor-core convolutions.
* ``measure.py`` -- ``measure_saved_activation_bytes`` / ``measure_segment_peak_bytes`` /
  ``count_step_flops`` observe one training step's activation memory and FLOPs, on the ``meta``
  device by default (no compute, no memory).
* ``settings.py`` -- ``resolve_memory(cfg, ...)`` turns the memory flags (``--low-memory`` and the
  explicit ones) into one ``MemorySettings``; ``apply_memory_transforms(model, settings)`` applies
  the transforms in their one valid order; ``activation_offload`` keeps saved activations on the CPU.
* ``compression.py`` -- ``apply_activation_compression(model, mode)`` (``none``, ``int8``, ``int4``,
  ``int2``): the tensors a training forward saves for backward are stored quantized (per-group
  ranges, stochastic rounding, bit-packed; ReLU outputs with an exact 1-bit mask) and restored in
  the backward pass.
* ``offload.py`` -- ``OffloadActivations``: the saved-tensor hooks behind ``activation_offload``
  (pinned host copies that keep the memory format, made on a side CUDA stream).

Imports torch and ``resnet_scale.config`` only; fairscale is imported when ``impl="fairscale"``
asks for it.
"""

from .checkpointing import (
    CHECKPOINT_IMPLS,
    CHECKPOINT_POLICIES,
    apply_activation_checkpointing,
    applied_checkpointing,
    parse_policy,
    segments,
)
from .compression import COMPRESSION_MODES, applied_compression, apply_activation_compression
from .layout import apply_channels_last
from .measure import count_step_flops, measure_saved_activation_bytes, measure_segment_peak_bytes

__all__ = [
    "CHECKPOINT_IMPLS",
    "CHECKPOINT_POLICIES",
    "COMPRESSION_MODES",
    "apply_activation_checkpointing",
    "apply_activation_compression",
    "apply_channels_last",
    "applied_checkpointing",
    "applied_compression",
    "count_step_flops",
    "measure_saved_activation_bytes",
    "measure_segment_peak_bytes",
    "parse_policy",
    "segments",
]
