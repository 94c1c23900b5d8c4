"""Memory transforms and measurements, applied from outside the model (DESIGN.md rules 1, 3).

* ``apply_activation_checkpointing(model, policy, impl=..., offload_to_cpu=...)`` --
  recompute residual blocks in the backward pass instead of storing their activations;
  ``segments(model, policy)`` lists what each segment holds.
* ``apply_channels_last(model)`` -- NHWC weights for tensor-core convolutions.
* ``measure_saved_activation_bytes`` / ``measure_segment_peak_bytes`` / ``count_step_flops`` --
  observe one training step's activation memory and FLOPs, on the ``meta`` device by default
  (no compute, no memory).

``CHECKPOINT_POLICIES`` (``--checkpointing``), name -> meaning:

* ``none``    -- no checkpointing.
* ``block``   -- each residual block is one segment.
* ``stage``   -- each stage ``layerN`` is one segment.
* ``sqrt``    -- ceil(sqrt(n)) consecutive blocks per segment, n = blocks in the model
  (Chen et al. 2016, arXiv:1604.06174).
* ``every:K`` -- K consecutive blocks per segment.

Segments never cross a stage boundary (each stage is chunked on its own); see
``resnet_scale/memory/checkpointing.py`` for why, and for the BatchNorm fix.
"""

from .checkpointing import (
    CHECKPOINT_IMPLS,
    CHECKPOINT_POLICIES,
    apply_activation_checkpointing,
    applied_checkpointing,
    parse_policy,
    segments,
)
from .layout import apply_channels_last
from .measure import count_step_flops, measure_saved_activation_bytes, measure_segment_peak_bytes

__all__ = [
    "CHECKPOINT_IMPLS",
    "CHECKPOINT_POLICIES",
    "apply_activation_checkpointing",
    "apply_channels_last",
    "applied_checkpointing",
    "count_step_flops",
    "measure_saved_activation_bytes",
    "measure_segment_peak_bytes",
    "parse_policy",
    "segments",
]
