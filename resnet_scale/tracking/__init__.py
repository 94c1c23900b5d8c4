"""Tracking and comparison: trackers (W&B, TensorBoard, none) fed by the training loop, and
reports that compare finished runs from their own folders (``resnet-scale report``).

* ``trackers.py`` -- ``build_tracker("wandb,tensorboard", ...)``: real trackers on the main process,
  a no-op on the others; one that fails is dropped, the others go on. The backends
  (``wandb_tracker.py``: offline by itself without an API key or network, the weights as a model
  artifact; ``tensorboard_tracker.py``: hyperparameters with the final metrics) are Accelerate
  trackers, imported only when asked for.
* ``environment.py`` -- ``environment_info()``: versions, git commit, CPU and GPU, saved with
  every run's config.
* ``runs.py`` -- finished runs read back from ``config.json``, ``metrics.jsonl`` and
  ``summary.json``, and grouped by a config key.
* ``report.py`` (with ``tables.py``, ``stats.py``, ``plots.py`` and ``export.py``) --
  ``build_report``: ``report.md``, ``report.html``, ``report.json``, figures (PNG, SVG, PDF) and
  tables (CSV, LaTeX) from the run folders alone; groups over seeds with Welch's intervals.
* ``wandb_report.py`` -- the same comparison as a W&B Report; ``offline.py`` reads an offline
  W&B run without the network.

Imports nothing of the package above ``resnet_scale._version``; wandb, tensorboard, matplotlib
and wandb-workspaces are imported only where they are used.
"""

from resnet_scale.tracking.runs import ReportError, expand_run_dirs, load_run
from resnet_scale.tracking.trackers import (
    TRACKERS,
    NullTracker,
    Tracker,
    TrackerGroup,
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
    "TrackerGroup",
    "TrackingError",
    "build_tracker",
    "build_tracker_config",
    "check_tracker",
    "expand_run_dirs",
    "load_run",
    "tracker_metrics",
]
