"""The W&B tracker: one run from the main process, offline by itself without an API key or network.

``WandbTracker`` is an Accelerate tracker (``accelerate.tracking.GeneralTracker``: ``name``,
``tracker`` is the W&B run, ``store_init_configuration``, ``log(values, step)``, ``finish``), guarded
so that a failing call is one warning line and the tracker goes quiet. Besides metrics it sends the
run summary, ``define_metric`` axes (test metrics against ``epoch``; ``epoch`` and ``time_s`` as x
axes) and the weights (``model.safetensors``, ``model_best.safetensors``) as a ``model`` artifact,
which an offline run records too (``wandb sync`` uploads it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

from resnet_scale.tracking.tracker_base import (
    Guarded,
    build_tracker_config,
    log,
    warn_once,
)
from resnet_scale.tracking.wandb_mode import wandb_mode

#: x axes, and the metrics plotted against them (W&B's own step is the optimizer step).
METRIC_AXES = (("epoch", None), ("time_s", None), ("test/*", "epoch"))


class WandbTracker(Guarded, GeneralTracker):
    """One W&B run. ``offline_dir``: the run's folder when offline (``wandb sync <it>``)."""

    name = "wandb"
    label = "W&B"
    requires_logging_directory = False

    def __init__(self, run):
        super().__init__()
        self._run = run
        self.run_id: str | None = run.id
        self.offline_dir: Path | None = None

    @property
    def tracker(self):
        return self._run

    def store_init_configuration(self, values: dict) -> None:
        self._guard("config", lambda: self._run.config.update(values, allow_val_change=True))

    def define_axes(self) -> None:
        for metric, step_metric in METRIC_AXES:
            self._guard("define_metric", lambda: self._run.define_metric(metric, step_metric=step_metric))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._guard("log", lambda: self._run.log(values, step=step, **kwargs))

    def summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", lambda: self._run.summary.update({k: v for k, v in values.items() if v is not None}))

    def log_weights(self, files: list, metadata: dict[str, Any] | None = None) -> None:
        """The weights files as one ``model`` artifact ``model-<run id>``, alias ``final`` (and ``best``
        when ``model_best.safetensors`` is among them). The entries point at the run's own files (no
        copy), which ``wandb sync`` uploads later for an offline run."""
        self._guard("artifact", self._log_weights, [Path(f) for f in files if Path(f).is_file()], metadata)

    def _log_weights(self, files: list[Path], metadata: dict[str, Any] | None) -> None:
        if not files:
            return
        import wandb

        artifact = wandb.Artifact(f"model-{self.run_id}", type="model", metadata=dict(metadata or {}),
                                  description="final and best weights (safetensors) of the run")
        for path in files:
            artifact.add_file(str(path), name=path.name, policy="immutable")
        aliases = ["final"] + (["best"] if any(p.name == "model_best.safetensors" for p in files) else [])
        self._run.log_artifact(artifact, aliases=aliases)

    def finish(self) -> None:
        self._guard("finish", lambda: self._run.finish())
        self.dropped = True


def build_wandb(run_dir: Path, config: dict, project: str, entity: str | None, group: str | None,
                tags: list[str], run_name: str, resume_id: str | None = None) -> WandbTracker | None:
    """The W&B run of the main process, or None (with one warning) when W&B cannot start one or
    ``WANDB_MODE=disabled``."""
    import wandb
    from wandb.sdk.lib.runid import generate_id

    if os.environ.get("WANDB_MODE") == "":  # wandb.Settings refuses an empty mode; empty means unset
        del os.environ["WANDB_MODE"]
    mode, reason = wandb_mode()
    if mode == "disabled":  # WANDB_MODE=disabled: W&B off, nothing written (what test suites set)
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(dir=str(run_dir), config=build_tracker_config(config), project=project, entity=entity,
                  group=group, tags=list(tags or []) or None, name=run_name, id=resume_id or generate_id(),
                  resume="allow" if resume_id else None, settings=wandb.Settings(quiet=True))
    run = None
    for attempt in ([mode, "offline"] if mode == "online" else [mode]):
        try:
            run = wandb.init(mode=attempt, **kwargs)
            mode = attempt
            break
        except Exception as err:  # noqa: BLE001 - a server/auth problem must not stop training
            reason = f"wandb.init failed ({type(err).__name__}: {err})"
            log.warning(f"W&B: {reason}" + ("; trying offline" if attempt == "online" else ""))
    if run is None:
        warn_once("wandb-init", "W&B could not start a run; training goes on without it "
                                f"(metrics are still in {run_dir}/metrics.jsonl).")
        return None
    tracker = WandbTracker(run)
    tracker.define_axes()
    if mode == "online":
        log.info(f"W&B run: {getattr(run, 'url', None) or run.id}")
    if mode == "offline":
        tracker.offline_dir = Path(run.dir).parent  # <run_dir>/wandb/offline-run-<time>-<id>
        warn_once("wandb-offline", f"W&B is offline: {reason}. This run is saved in {tracker.offline_dir}; "
                                   f"upload it later with: wandb sync {tracker.offline_dir}")
    return tracker
