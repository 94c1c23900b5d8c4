"""What every tracker shares: the metric names sent (``tracker_metrics``), the config sent
(``build_tracker_config``, credentials removed), the no-op tracker, and the guard that drops a failing
tracker with one warning line while the run and the other trackers go on. No tracker package (nor
accelerate, nor torch) is imported here."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Protocol

log = logging.getLogger("resnet_scale")

_SECRET_KEY = re.compile(r"(api_?key|token|secret|password)", re.IGNORECASE)
_warned: set[str] = set()  # each notice is given once per process
#: The config sections, flattened into TensorBoard's hyperparameters (``model.block`` ...).
SECTIONS = ("model", "data", "optim", "memory", "distributed", "train")

PACKAGE_HINTS = {
    "wandb": "--tracker wandb needs the wandb package: pip install 'resnet-scale[wandb]' "
             "(or train with --tracker none or --tracker tensorboard).",
    "tensorboard": "--tracker tensorboard needs the tensorboard package: pip install 'resnet-scale[tensorboard]' "
                   "(or train with --tracker none or --tracker wandb).",
}


class TrackingError(ValueError):
    """A tracker that cannot be built as asked (e.g. its package is not installed). The message
    says what to install or which flag to change."""


class Tracker(Protocol):
    run_id: str | None

    def log(self, record: dict[str, Any], step: int) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def log_weights(self, files: list, metadata: dict[str, Any] | None = None) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    """Tracks nothing: ``--tracker none``, non-main ranks, and trackers that could not start. It
    carries the run id a resumed run was given (a part of a run without W&B keeps W&B's id for the
    next part)."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id

    def log(self, record: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_weights(self, files: list, metadata: dict[str, Any] | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


class Guarded:
    """A backend whose every call is guarded: the first failure is one warning line, then this
    tracker goes quiet (``dropped``); training and the other trackers go on."""

    label = "tracker"
    dropped = False

    def _guard(self, what: str, fn, *args) -> Any:
        if self.dropped:
            return None
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            warn_once(f"{self.label}-{what}", f"{self.label} {what} failed ({type(err).__name__}: {err}); "
                                              f"{self.label} stops, the run's own files and any other tracker go on.")
            self.dropped = True
            return None


# -- what is sent ---------------------------------------------------------------------------------
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def tracker_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` record as tracker keys: ``train/loss``, ``train/lr``,
    ``train/images_per_s``, ``train/step_time_s``, ``train/grad_norm``; ``test/loss``,
    ``test/accuracy``, ``test/epoch_time_s``, ``test/peak_memory_bytes`` ... (``<split>/<key>`` for
    every number the record holds), plus ``epoch`` and ``time_s`` (seconds since the start) as
    x axes. ``None`` values (e.g. peak memory on a CPU) are left out."""
    split = record.get("split", "train")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "split") or not _number(value):
            continue
        out[key if key in ("epoch", "time_s") else f"{split}/{key}"] = value
    return out


def _scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    """Drop keys that name credentials and blank any string equal to a known secret."""
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, str) and value and value in secrets:
        return "<redacted>"
    return value


def build_tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config sent to a tracker: the sections of ``config.json`` (model, data, optim, memory,
    distributed, train) at the top level (so W&B shows ``model.block``), then what is saved beside
    them (``environment``: versions, git commit, CPU/GPU model; ``world_size``; the resolved memory
    settings as ``memory_resolved``). A plain ``Config.to_dict()`` is accepted too. ``environment``
    is filled in when missing. Credentials are removed."""
    config = dict(config)
    sections = config.pop("config", None)
    out: dict[str, Any] = dict(sections) if isinstance(sections, dict) else {}
    for key, value in config.items():
        out[f"{key}_resolved" if key in out else key] = value
    if "environment" not in out:
        from resnet_scale.tracking.environment import environment_info

        out["environment"] = environment_info()
    secrets = tuple(v for k, v in os.environ.items() if _SECRET_KEY.search(k) and len(v) >= 8)
    return _scrub(out, secrets)


def hparams_of(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The config sections of ``build_tracker_config`` as flat ``section.field`` scalars (what
    TensorBoard's hyperparameters take): ``None`` is ``"none"``, a list ``"a,b"``."""
    out: dict[str, bool | int | float | str] = {}
    for section in SECTIONS:
        for key, value in (config.get(section) or {}).items():
            if value is None:
                value = "none"
            elif isinstance(value, (list, tuple)):
                value = ",".join(map(str, value))
            elif isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
            out[f"{section}.{key}"] = value
    return out
