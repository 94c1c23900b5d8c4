"""Trackers: where a run's numbers go besides its own folder (``metrics.jsonl``/``summary.json``,
written whatever the tracker).

``build_tracker("wandb" | "tensorboard" | "none", ...)`` returns an object with ``log(record,
step)``, ``summary(values)``, ``finish()`` and ``run_id``. Only the main process gets a real one;
every other rank gets a no-op (one W&B run per rank is a commonly reported mistake).

W&B goes offline by itself when there is no API key, no network, or ``WANDB_MODE=offline``, and
says so once, with the ``wandb sync`` command that uploads the run later. Training never fails
because tracking cannot reach a server: a failed ``wandb.init`` is a warning and a no-op tracker.
API keys are never put into the config sent to a tracker (nor anywhere this package writes).
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
import socket
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

log = logging.getLogger("resnet_scale")

TRACKERS = ("wandb", "tensorboard", "none")
_DEFAULT_BASE_URL = "https://api.wandb.ai"
_SECRET_KEY = re.compile(r"(api_?key|token|secret|password)", re.IGNORECASE)
_warned: set[str] = set()  # the offline notice is given once per process


class TrackingError(ValueError):
    """A tracker that cannot be built as asked (e.g. its package is not installed). The message
    says what to install or which flag to change."""


class Tracker(Protocol):
    run_id: str | None

    def log(self, record: dict[str, Any], step: int) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    """Tracks nothing: ``--tracker none``, non-main ranks, and a W&B run that could not start."""

    run_id: str | None = None

    def log(self, record: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


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


# -- W&B ------------------------------------------------------------------------------------------
def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or _DEFAULT_BASE_URL


def has_wandb_credentials() -> bool:
    """An API key in ``WANDB_API_KEY``, a ``netrc`` entry for the W&B host (what ``wandb login``
    writes), or an identity-token file."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(_base_url()).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return bool(netrc.netrc(path).authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_server_reachable(timeout: float = 3.0) -> str | None:
    """``None`` when a TCP connection to the W&B server opens, else why not."""
    url = urlparse(_base_url())
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot reach {_base_url()} ({err.strerror or err})"


def wandb_mode() -> tuple[str, str | None]:
    """(mode, why offline): ``online`` only with credentials and a reachable server."""
    env = (os.environ.get("WANDB_MODE") or "").lower()
    if env == "disabled":
        return "disabled", None
    if env in ("offline", "dryrun"):
        return "offline", "WANDB_MODE=offline"
    if not has_wandb_credentials():
        host = urlparse(_base_url()).hostname
        return "offline", f"no W&B API key (WANDB_API_KEY is unset and ~/.netrc has no entry for {host})"
    unreachable = wandb_server_reachable()
    if unreachable:
        return "offline", unreachable
    return "online", None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


class WandbTracker:
    """One W&B run. Failures while logging are a warning, then the tracker goes quiet."""

    def __init__(self, run):
        self._run = run
        self.run_id: str | None = run.id
        self.offline_dir: Path | None = None

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self._run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            _warn_once(f"wandb-{what}", f"W&B {what} failed ({err}); tracking stops, the run's own files go on.")
            self._run = None

    def log(self, record: dict[str, Any], step: int) -> None:
        if self._run is not None:
            self._guard("log", self._run.log, tracker_metrics(record), step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            self._guard("summary", self._run.summary.update, {k: v for k, v in values.items() if v is not None})

    def finish(self) -> None:
        if self._run is not None:
            self._guard("finish", self._run.finish)
            self._run = None


_PACKAGE_HINTS = {
    "wandb": "--tracker wandb needs the wandb package: pip install 'resnet-scale[wandb]' "
             "(or train with --tracker none or --tracker tensorboard).",
    "tensorboard": "--tracker tensorboard needs the tensorboard package: pip install tensorboard "
                   "(or train with --tracker none or --tracker wandb).",
}


def check_tracker(kind: str) -> None:
    """Refuse an unknown kind or a tracker whose package is missing (TrackingError with the pip
    command). Call it on every rank, early (before loading data), so all of them stop together
    with the same message; ``build_tracker`` calls it too."""
    import importlib.util

    if kind not in TRACKERS:
        raise TrackingError(f"--tracker {kind!r} is not one of {', '.join(TRACKERS)}.")
    if kind in _PACKAGE_HINTS and importlib.util.find_spec(kind) is None:
        raise TrackingError(_PACKAGE_HINTS[kind])


def _build_wandb(run_dir: Path, config: dict, project: str, entity: str | None, group: str | None,
                 tags: list[str], run_name: str, resume_id: str | None = None) -> Tracker:
    import wandb
    from wandb.sdk.lib.runid import generate_id

    if os.environ.get("WANDB_MODE") == "":  # wandb.Settings refuses an empty mode; empty means unset
        del os.environ["WANDB_MODE"]
    mode, reason = wandb_mode()
    if mode == "disabled":  # WANDB_MODE=disabled: W&B off, nothing written (what test suites set)
        return NullTracker()
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
        _warn_once("wandb-init", "W&B could not start a run; training goes on without it "
                                 f"(metrics are still in {run_dir}/metrics.jsonl).")
        return NullTracker()
    tracker = WandbTracker(run)
    if mode == "online":
        log.info(f"W&B run: {getattr(run, 'url', None) or run.id}")
    if mode == "offline":
        tracker.offline_dir = Path(run.dir).parent  # <run_dir>/wandb/offline-run-<time>-<id>
        _warn_once("wandb-offline", f"W&B is offline: {reason}. This run is saved in {tracker.offline_dir}; "
                                    f"upload it later with: wandb sync {tracker.offline_dir}")
    return tracker


# -- TensorBoard ----------------------------------------------------------------------------------
class TensorBoardTracker:
    """Event files under ``<run_dir>/tensorboard`` (``tensorboard --logdir <output_dir>``)."""

    run_id: str | None = None

    def __init__(self, writer, config: dict[str, Any]):
        self._writer = writer
        self._writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, record: dict[str, Any], step: int) -> None:
        for key, value in tracker_metrics(record).items():
            self._writer.add_scalar(key, value, step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if _number(value):
                self._writer.add_scalar(f"summary/{key}", value, 0)
        self._writer.add_text("summary", "```json\n" + json.dumps(values, indent=2, default=str) + "\n```")

    def finish(self) -> None:
        self._writer.close()


def _build_tensorboard(run_dir: Path, config: dict) -> Tracker:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrackingError(_PACKAGE_HINTS["tensorboard"]) from None
    return TensorBoardTracker(SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard")),
                              build_tracker_config(config))


def build_tracker(kind: str, *, is_main: bool, run_dir: Path, config: dict, project: str,
                  entity: str | None = None, group: str | None = None, tags: list[str] | None = None,
                  run_name: str, resume_id: str | None = None) -> Tracker:
    """The tracker of one run. ``config`` is what ``config.json`` holds (``{"config": sections,
    "environment": ..., ...}``); ``run_dir`` is the run's folder (W&B writes ``<run_dir>/wandb``).
    Non-main processes get a no-op tracker and create nothing. ``resume_id``: the W&B run id a
    checkpoint recorded; a resumed run continues that W&B run (offline too: ``wandb sync``
    uploads both parts into the one run)."""
    check_tracker(kind)
    if kind == "none" or not is_main:
        return NullTracker()
    if kind == "tensorboard":
        return _build_tensorboard(run_dir, config)
    return _build_wandb(run_dir, config, project, entity, group, tags or [], run_name, resume_id)
