"""Decisions every rank takes together after each optimizer step: stop (SIGTERM / SIGUSR1), save
a checkpoint (every N steps or M minutes) and what a non-finite loss means.

With several processes they travel in ONE small all-reduce per step (the main process's clock
decides the time-based saves, any rank's signal or non-finite loss counts for all), so every
rank saves, skips or stops at the same step. With one process the only synchronisation is
reading whether the loss was finite.

Non-finite losses (Goodfellow et al. 2016 §8.2 on exploding gradients; fp16 loss scaling is
Micikevicius et al. 2018): under fp16 the GradScaler already skips an update whose gradients
overflow (``skipped`` steps). Under bf16/fp32 ``train_step`` skips the update itself when the
all-reduced gradient norm is not finite, so the weights stay finite; ``--max-bad-steps`` such
steps in a row stop the run. DeepSpeed applies its update inside ``backward``, before anyone can
look, so there the first non-finite loss stops the run. Whatever happens, weights that are not
finite are never written: ``check_finite_weights`` runs before every checkpoint and the final save.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from resnet_scale.train.signals import StopFlag
from resnet_scale.train.step import StepResult

logger = logging.getLogger("resnet_scale")

#: Exit status of a run stopped because its loss or weights stopped being finite.
EXIT_NONFINITE = 4


class NonFiniteError(Exception):
    """The loss or the weights are no longer finite; nothing non-finite was saved."""


@dataclass
class Decision:
    stop: bool  # a signal asked every rank to save and stop
    save: bool  # save a checkpoint after this step
    bad: bool  # this step's loss or gradient was not finite (its update was skipped)


class LoopControl:
    def __init__(self, accelerator: Accelerator, *, every_steps: int | None, every_minutes: float | None,
                 max_bad_steps: int, deepspeed: bool, bad_steps: int = 0):
        self.accelerator = accelerator
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60 if every_minutes else None
        self.max_bad_steps = max_bad_steps
        self.deepspeed = deepspeed
        self.bad_steps = bad_steps  # in the whole run (a resumed run carries it on)
        self.bad_in_a_row = 0
        self.last_save = time.monotonic()
        self.stop_flag = StopFlag().install()

    def after_step(self, step: int, result: StepResult) -> Decision:
        acc = self.accelerator
        due = bool(self.every_seconds and acc.is_main_process
                   and time.monotonic() - self.last_save >= self.every_seconds)
        if acc.num_processes > 1:
            flags = torch.stack([
                torch.tensor(float(self.stop_flag.requested), device=acc.device),
                torch.tensor(float(due), device=acc.device),
                (~torch.isfinite(result.loss_sum)).float().to(acc.device),
            ])
            stop, due, nonfinite = (v > 0 for v in acc.reduce(flags, reduction="sum").tolist())
        else:
            stop, nonfinite = self.stop_flag.requested, not bool(torch.isfinite(result.loss_sum))
        bad = nonfinite or not result.finite
        if bad:
            self._bad(step, result)
        else:
            self.bad_in_a_row = 0
        save = stop or due or bool(self.every_steps and step % self.every_steps == 0)
        return Decision(stop=stop, save=save, bad=bad)

    def _bad(self, step: int, result: StepResult) -> None:
        self.bad_steps += 1
        self.bad_in_a_row += 1
        what = f"step {step}: the loss or gradient is not finite (loss sum {float(result.loss_sum):.4g} on this rank)"
        advice = "lower --lr, add --max-grad-norm 1.0, or use --precision fp32/bf16 instead of fp16"
        if self.deepspeed:
            raise NonFiniteError(
                f"{what}; DeepSpeed applied the update inside backward, so the weights cannot be trusted and "
                f"nothing is saved. Resume from the newest checkpoint (--resume auto) and {advice}.")
        if self.bad_in_a_row >= self.max_bad_steps:
            raise NonFiniteError(
                f"{what}, {self.bad_in_a_row} steps in a row (--max-bad-steps {self.max_bad_steps}); every one's "
                f"update was skipped, so the weights and checkpoints stay finite. Stopping: {advice}, then "
                "--resume auto from the newest checkpoint.")
        if self.accelerator.is_main_process:
            logger.warning(f"{what}; its update was skipped ({self.bad_in_a_row} in a row, the run stops at "
                           f"--max-bad-steps {self.max_bad_steps}).")

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def close(self) -> None:
        self.stop_flag.restore()


def check_finite_weights(model: torch.nn.Module, accelerator: Accelerator, what: str) -> None:
    """Raise NonFiniteError unless every parameter and buffer is finite on every rank (a
    collective with several processes; ZeRO-3's shards are checked where they live)."""
    bad = torch.zeros((), device=accelerator.device)
    for tensor in list(model.parameters()) + list(model.buffers()):
        local = getattr(tensor, "ds_tensor", None)  # a ZeRO-3 partition: the data lives here
        local = local if local is not None else tensor
        if local.is_floating_point() and local.numel() and not torch.isfinite(local).all():
            bad += 1
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if float(bad) > 0:
        raise NonFiniteError(f"the weights are not finite; {what} was not saved (earlier checkpoints are kept). "
                             "Resume from the newest checkpoint (--resume auto) with a lower --lr or --max-grad-norm.")


def requeue_slurm_job() -> str:
    """``scontrol requeue $SLURM_JOB_ID`` (the job must be requeueable: sbatch --requeue or the
    cluster's JobRequeue=1). Returns what happened, for the log."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "--requeue: not under SLURM (no SLURM_JOB_ID); not requeued"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"--requeue: scontrol is not on PATH; job {job} not requeued"
    out = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return f"--requeue: scontrol requeue {job} failed ({out.stderr.strip() or out.returncode})"
    return f"--requeue: job {job} is back in the queue; it continues with --resume auto"
