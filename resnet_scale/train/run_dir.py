"""A run's folder: ``config.json``, ``metrics.jsonl``, ``summary.json``, ``model.safetensors`` (the
final weights) and ``model_best.safetensors`` (the weights of the best test accuracy so far).

Only the main process writes (the trainer guarantees that). Files that describe a finished run
are written to a temporary name and renamed, so a crash never leaves half a file under the real
name, and nothing of an earlier run is overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from resnet_scale.config import Config, ConfigError, check_run_name

#: The final weights, and those of the best test accuracy (written when an evaluation beats the best).
FINAL_WEIGHTS, BEST_WEIGHTS = "model.safetensors", "model_best.safetensors"


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse an ``--output-dir`` no run folder can be made in: it, or else the nearest folder above
    it that exists, must be a folder this user may write in. Only looks (creates nothing), so the
    CLI calls it before any data is read; :meth:`RunDir.create` calls it again."""
    out = Path(output_dir)
    base = out
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent
    where = "--output-dir" if base == out else f"--output-dir {out} cannot be created:"
    if not base.is_dir():
        kind = "a file" if base.is_file() else "not a folder"
        raise ConfigError(f"{where} {base} is {kind}, so no run folder can be made in it; nothing was "
                          f"changed. Choose another --output-dir (or move {base} away).")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} {base} is not writable by this user (permission denied); nothing was "
                          f"changed. Choose another --output-dir, or make it writable (chmod u+wx {base}).")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    """The folder of one run. Creating it refuses to reuse a folder that already holds a run."""

    def __init__(self, output_dir: str | Path, run_name: str):
        self.path = Path(output_dir) / check_run_name(run_name)
        self.metrics_path = self.path / "metrics.jsonl"
        self._metrics = None
        self.lines_written = 0  # events in metrics.jsonl (a checkpoint records it)

    def create(self) -> "RunDir":
        check_output_dir(self.path.parent)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--output-dir {self.path.parent}: cannot create it ({err.strerror}); "
                              "choose another --output-dir.") from None
        if os.path.lexists(self.path) and not self.path.is_dir():
            raise ConfigError(f"{self.path} is a file, not a run folder; nothing was changed. "
                              "Choose another --run-name.")
        if self.path.exists() and any(self.path.iterdir()):
            raise ConfigError(
                f"run folder {self.path} already holds a run; nothing was changed. "
                "Choose another --run-name (or leave it out for a generated one)."
            )
        self.path.mkdir(exist_ok=True)
        return self

    def reopen(self, *, metrics_lines: int) -> "RunDir":
        """Continue this run's folder after a checkpoint: metrics.jsonl is cut back to the lines it
        had when the checkpoint was saved, so no event appears twice."""
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"{self.path} holds no run (no config.json) to resume.")
        lines = self.metrics_path.read_text().splitlines(keepends=True) if self.metrics_path.exists() else []
        _atomic_write(self.metrics_path, "".join(lines[:metrics_lines]))
        self.lines_written = min(metrics_lines, len(lines))
        return self

    def write_config(self, cfg: Config, extra: dict[str, Any]) -> None:
        payload = {"config": cfg.to_dict(), **extra}
        _atomic_write(self.path / "config.json", json.dumps(payload, indent=2) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        """Append one event to metrics.jsonl (flushed at once: a killed run keeps its history)."""
        if self._metrics is None:
            self._metrics = open(self.metrics_path, "a", buffering=1)
        self._metrics.write(json.dumps(record) + "\n")
        self.lines_written += 1

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json("summary.json", summary)

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        _atomic_write(self.path / name, json.dumps(payload, indent=2) + "\n")

    def save_weights(self, state_dict: dict[str, torch.Tensor], name: str = FINAL_WEIGHTS,
                     metadata: dict[str, str] | None = None) -> Path:
        """Weights as ``name`` (``model.safetensors``: the final ones), contiguous, on CPU; they load into
        a plain model. ``metadata``: strings kept in the file's header (the step and accuracy of the best)."""
        from safetensors.torch import save_file

        tensors = {plain_key(k): v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, target)
        return target

    def set_aside_later_best(self, step: int) -> Path | None:
        """A resume from step ``step``: a ``model_best.safetensors`` saved after that step belongs to the
        abandoned continuation (a resume from an older checkpoint, or a start over), not to the run as it
        continues now, whose best accuracy is the checkpoint's. It is renamed, not deleted:
        ``model_best.step-N.safetensors``; the run writes a new one at its next best. Returns the new name."""
        best = self.path / BEST_WEIGHTS
        saved = weights_metadata(best).get("step") if best.is_file() else None
        if saved is None or not saved.isdigit() or int(saved) <= step:
            return None
        aside = best.with_name(f"model_best.step-{int(saved)}.safetensors")
        os.replace(best, aside)
        return aside

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def read_run_config(path: Path, consequence: str = "") -> tuple[dict[str, Any], Config]:
    """A run's ``config.json``: the whole file and its ``config`` as a :class:`Config`; a file that
    cannot be read as one is a ConfigError naming it (``consequence`` ends the message)."""
    try:
        saved = json.loads(path.read_text())
        return saved, Config.from_dict(saved["config"])
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as err:
        raise ConfigError(f"{path} cannot be read as the run's config ({type(err).__name__}: "
                          f"{str(err)[:200]}){consequence}.") from None


def plain_key(key: str) -> str:
    """A state_dict key as the plain model names it: a torch.compile'd model (--compile) prefixes
    every key with ``_orig_mod.``, which a model built by ``build_resnet`` does not know."""
    return key.removeprefix("_orig_mod.")


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a ``.safetensors`` file (reads the header only); {} when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - a damaged or foreign file: no metadata to go by
        return {}


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` (never unpickles anything)."""
    from safetensors.torch import load_file

    return load_file(str(path))
