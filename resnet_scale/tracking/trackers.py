"""Trackers: where a run's numbers go besides its own folder (``metrics.jsonl``/``summary.json``,
written whatever the trackers).

``build_tracker("wandb" | "tensorboard" | "wandb,tensorboard" | "none", ...)`` returns an object with
``log(record, step)``, ``summary(values)``, ``log_weights(files)``, ``finish()`` and ``run_id``: a
``TrackerGroup`` that sends each record to every tracker asked for. Only the main process gets real
trackers; every other rank gets a no-op (one W&B run per rank is a commonly reported mistake).

Each backend is an Accelerate tracker (``accelerate.tracking.GeneralTracker``: ``wandb_tracker.py``,
``tensorboard_tracker.py``), built here rather than by ``Accelerator(log_with=...)`` because the
guarantees below need it: Accelerate's ``init_trackers`` and ``log`` let one tracker's exception
stop the run and the other trackers, its W&B tracker has no offline fallback, its TensorBoard tracker
writes hyperparameters at the start (without the final metrics) and refuses a nested config, and
``end_training`` also ends the process group, which this package leaves to the caller that started it.

W&B goes offline by itself when there is no API key, no network, or ``WANDB_MODE=offline``, and
says so once, with the ``wandb sync`` command that uploads the run later. Training never fails
because a tracker does: a tracker that cannot start, or fails later, is dropped with one warning
line and the others go on. API keys are never put into the config sent to a tracker (nor anywhere
this package writes).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

from resnet_scale.tracking.tracker_base import (  # noqa: F401 - re-exported, the names users import from here
    PACKAGE_HINTS,
    NullTracker,
    Tracker,
    TrackingError,
    build_tracker_config,
    hparams_of,
    tracker_metrics,
    warn_once,
)
from resnet_scale.tracking.wandb_mode import (  # noqa: F401
    has_wandb_credentials,
    wandb_mode,
    wandb_server_reachable,
)

TRACKERS = ("wandb", "tensorboard", "none")

def parse_trackers(kinds: str | Sequence[str]) -> tuple[str, ...]:
    """``"wandb,tensorboard"`` (or a list) as a tuple of kinds; ``none`` is (). TrackingError for an
    unknown name."""
    words = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    out = tuple(dict.fromkeys(w.strip() for w in words if w.strip()))
    for kind in out:
        if kind not in TRACKERS:
            raise TrackingError(f"--tracker {kind!r} is not one of {', '.join(TRACKERS)} "
                                "(several: --tracker wandb,tensorboard).")
    if "none" in out and len(out) > 1:
        raise TrackingError(f"--tracker {','.join(out)}: 'none' stands alone.")
    return tuple(k for k in out if k != "none")


def check_tracker(kinds: str | Sequence[str]) -> None:
    """Refuse an unknown kind or a tracker whose package is missing (TrackingError with the pip
    command). Call it on every rank, early (before loading data), so all of them stop together
    with the same message; ``build_tracker`` calls it too."""
    for kind in parse_trackers(kinds):
        if kind in PACKAGE_HINTS and importlib.util.find_spec(kind) is None:
            raise TrackingError(PACKAGE_HINTS[kind])
        if kind == "tensorboard":  # installed but broken (a dependency missing): say so before training
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError as err:
                raise TrackingError(f"--tracker tensorboard: tensorboard is installed but cannot be imported "
                                    f"({err}); reinstall it (pip install --force-reinstall tensorboard) or "
                                    "train with --tracker none or --tracker wandb.") from None


class TrackerGroup:
    """The trackers of one run. A record goes to each as tracker metrics (``tracker_metrics``);
    each tracker guards itself, so one that fails is dropped with one warning and the others go on.

    ``run_id`` is the one run id a checkpoint keeps (``loop_state.json`` ``tracker_run_id``): W&B's,
    the only tracker here with a run to continue (TensorBoard's run is its folder, which a resumed
    run writes on into). Without W&B in this part of a run, the id it was resumed with is carried
    on, so a later part with W&B continues the same W&B run."""

    def __init__(self, trackers: list, resume_id: str | None = None):
        self.trackers = list(trackers)
        self._carried = resume_id

    @property
    def run_id(self) -> str | None:
        return next((t.run_id for t in self.trackers if t.run_id), self._carried)

    def get(self, name: str):
        """The tracker called ``name`` (``wandb``, ``tensorboard``), or None."""
        return next((t for t in self.trackers if t.name == name), None)

    def log(self, record: dict[str, Any], step: int) -> None:
        values = tracker_metrics(record)
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.summary(values)

    def log_weights(self, files: list, metadata: dict[str, Any] | None = None) -> None:
        for tracker in self.trackers:
            tracker.log_weights(files, metadata)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _start(kind: str, build) -> Any:
    """A backend, or None with one warning when it cannot start (a missing package is refused
    earlier, by ``check_tracker``)."""
    try:
        return build()
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - a tracker that cannot start must not stop training
        warn_once(f"{kind}-start", f"{kind} tracker could not start ({type(err).__name__}: {err}); training goes "
                                   "on without it.")
        return None


def build_tracker(kind: str | Sequence[str], *, is_main: bool, run_dir: Path, config: dict, project: str,
                  entity: str | None = None, group: str | None = None, tags: list[str] | None = None,
                  run_name: str, resume_id: str | None = None) -> TrackerGroup | NullTracker:
    """The trackers of one run: ``kind`` names one or several (``"wandb,tensorboard"`` or a list).
    ``config`` is what ``config.json`` holds (``{"config": sections, "environment": ..., ...}``);
    ``run_dir`` is the run's folder (W&B writes ``<run_dir>/wandb``, TensorBoard
    ``<run_dir>/tensorboard``). Non-main processes get a no-op tracker and create nothing.
    ``resume_id``: the W&B run id a checkpoint recorded; a resumed run continues that W&B run
    (offline too: ``wandb sync`` uploads both parts into the one run). When no tracker starts, a
    ``NullTracker`` carrying ``resume_id``."""
    kinds = parse_trackers(kind)
    check_tracker(kinds)
    if not kinds or not is_main:
        return NullTracker(resume_id if is_main else None)
    started = []
    for name in kinds:
        if name == "tensorboard":
            from resnet_scale.tracking.tensorboard_tracker import build_tensorboard

            started.append(_start(name, lambda: build_tensorboard(run_dir, config)))
        else:
            from resnet_scale.tracking.wandb_tracker import build_wandb

            started.append(_start(name, lambda: build_wandb(run_dir, config, project, entity, group, tags or [],
                                                            run_name, resume_id)))
    started = [t for t in started if t is not None]
    return TrackerGroup(started, resume_id) if started else NullTracker(resume_id)
