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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from resnet_scale.config import Config
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
                 max_bad_steps: int, deepspeed: bool, bad_steps: int = 0,
                 advice: Callable[[int], str] | None = None):
        self.accelerator = accelerator
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60 if every_minutes else None
        self.max_bad_steps = max_bad_steps
        self.deepspeed = deepspeed
        self.bad_steps = bad_steps  # in the whole run (a resumed run carries it on)
        self.bad_in_a_row = 0
        self.advice = advice or (lambda first_bad: "lower --lr or set --max-grad-norm, then --resume auto from the "
                                                   "newest checkpoint")  # what to change: see resume_advice
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
        if self.deepspeed:
            raise NonFiniteError(
                f"{what}; DeepSpeed applied the update inside backward, so the weights of step {step} cannot be "
                f"trusted and nothing is saved. {self.advice(step)}")
        if self.bad_in_a_row >= self.max_bad_steps:
            raise NonFiniteError(
                f"{what}, {self.bad_in_a_row} steps in a row (--max-bad-steps {self.max_bad_steps}); every one's "
                f"update was skipped, so the weights stayed finite. Stopping. "
                f"{self.advice(step - self.bad_in_a_row + 1)}")
        if self.accelerator.is_main_process:
            logger.warning(f"{what}; its update was skipped ({self.bad_in_a_row} in a row, the run stops at "
                           f"--max-bad-steps {self.max_bad_steps}).")

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def close(self) -> None:
        self.stop_flag.restore()


def resume_advice(cfg: Config, precision: str, checkpoints: list[Path], first_bad: int | None = None) -> str:
    """What to do after a non-finite stop: which checkpoint to continue from (every checkpoint holds
    finite weights: none is written otherwise) and what to change, as the flags are set in this run.
    ``first_bad``: the first step of a run of skipped non-finite steps. A checkpoint saved after the
    step before it holds the very weights those steps started from: resumed with only a lower --lr,
    the same batch would go non-finite again, so an earlier checkpoint is named."""
    o = cfg.optim
    change = [f"a lower --lr than this run's {o.lr:g}"]
    if o.max_grad_norm is None:
        change.append("--max-grad-norm 1.0 (this run does not clip gradients)")
    else:
        change.append(f"a lower --max-grad-norm than this run's {o.max_grad_norm:g}")
    if precision != "fp32":
        change.append(f"--precision {'bf16 or fp32' if precision == 'fp16' else 'fp32'} instead of {precision}")
    options = " and/or ".join(change)
    if not checkpoints:
        return f"No checkpoint was saved before this step; start a new run with {options}."
    step = {p: int(p.name.split("-")[-1]) for p in checkpoints}
    start, newest = checkpoints[-1], checkpoints[-1]
    where = f"The newest checkpoint, {newest} (step {step[newest]}), holds finite weights"
    if first_bad is not None and step[newest] >= first_bad - 1:
        earlier = [p for p in checkpoints if step[p] < first_bad - 1]
        where += f", but the non-finite steps {first_bad}.. started from those very weights"
        if not earlier:
            return f"{where} and no earlier checkpoint is kept; start a new run with {options}."
        start = earlier[-1]
        where += f"; the one before them is {start} (step {step[start]})"
    resume = "--resume auto" if start == newest else f"--resume {start}"
    return (f"{where}. Continue from it with {options}, naming each setting you change, e.g. {resume} "
            f"--override lr --lr {o.lr / 10:g}.")


def check_finite_weights(model: torch.nn.Module, accelerator: Accelerator, what: str,
                         advice: str | None = None) -> None:
    """Raise NonFiniteError unless every parameter and buffer is finite on every rank (a
    collective with several processes; ZeRO-3's shards are checked where they live). ``advice``:
    what to do then (``resume_advice``)."""
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
                             + (advice or "Resume from the newest checkpoint (--resume auto) with a lower --lr "
                                          "or --max-grad-norm."))


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
