"""Tracking and comparison: trackers (W&B, TensorBoard, none) fed by the training loop, and
reports that compare finished runs from their own folders (``resnet-scale report``).

wandb, tensorboard, matplotlib and wandb-workspaces are imported only where they are used.
"""

from resnet_scale.tracking.runs import ReportError, expand_run_dirs, load_run
from resnet_scale.tracking.trackers import (
    TRACKERS,
    NullTracker,
    Tracker,
    TrackingError,
    build_tracker,
    build_tracker_config,
    check_tracker,
    tracker_metrics,
)

__all__ = [
    "TRACKERS",
    "NullTracker",
    "ReportError",
    "Tracker",
    "TrackingError",
    "build_tracker",
    "build_tracker_config",
    "check_tracker",
    "expand_run_dirs",
    "load_run",
    "tracker_metrics",
]
