"""Checkpoints of a run: ``<run>/checkpoints/step-NNNNNNNNN/``, written atomically.

Every process calls ``save_checkpoint`` (``accelerator.save_state`` is collective under DDP and
ZeRO). The state goes to a hidden temporary folder; only when it is complete does the main
process write ``loop_state.json`` and the ``COMPLETE`` marker and rename the folder, so a crash
mid-save never leaves a half checkpoint under a real name. ``latest_checkpoint`` only ever
returns complete ones. The loop's counters and metric windows travel in ``loop_state.json`` so
a resumed run continues at the exact next batch with identical metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from resnet_scale.config import ConfigError

CHECKPOINTS = "checkpoints"
_MARKER = "COMPLETE"
#: Exit status of a run that saved a checkpoint and stopped because it was asked to (SIGTERM,
#: SIGUSR1): EX_TEMPFAIL, "try again later" — resume with --resume auto.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved; the CLI exits with EXIT_PREEMPTED."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"preempted: saved {checkpoint}; continue with --resume auto")
        self.checkpoint = checkpoint


def checkpoint_dirs(run_path: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_path) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / _MARKER).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(run_path: Path) -> Path | None:
    found = checkpoint_dirs(run_path)
    return found[-1] if found else None


def save_checkpoint(accelerator: Accelerator, run_path: Path, step: int, loop_state: dict[str, Any],
                    keep: int) -> Path:
    root = Path(run_path) / CHECKPOINTS
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "loop_state.json").write_text(json.dumps(loop_state, indent=2) + "\n")
        (tmp / _MARKER).write_text(f"step {step}\n")
        if final.exists():  # the same step saved again (epoch end right after a step checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_path)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | None, run_path: Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` = the newest complete one of this run (None when
    there is none: a fresh start), or a given checkpoint folder."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_path)
    path = Path(resume)
    if not (path / _MARKER).is_file() or not (path / "loop_state.json").is_file():
        raise ConfigError(
            f"--resume {resume}: not a complete checkpoint (a folder with loop_state.json and {_MARKER}, "
            f"under <run>/{CHECKPOINTS}/); use --resume auto for the newest one of the run."
        )
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, registered scheduler and RNG states; return the loop state."""
    try:
        loop_state = json.loads((path / "loop_state.json").read_text())
        accelerator.load_state(str(path))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ConfigError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); "
                          "resume from an earlier one with --resume PATH.") from None
    return loop_state


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checks it after each optimizer step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
