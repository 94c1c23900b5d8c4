"""Decisions every rank takes together after an optimizer step: stop (SIGTERM / SIGUSR1 / Ctrl-C),
save a checkpoint (every N steps or M minutes) and what a non-finite loss means, taken without a
host synchronisation in a step that does not log, save or stop.

Each step's flags stay on the device: :meth:`LoopControl.after_step` only keeps references to them.
They are read in ONE transfer at a *read point*: a step that logs, a step the checkpoint schedule
saves at, and (one process) a step a signal or the clock asks to save at. There the bad steps since
the last read point are gone through one by one, exactly as if each had been read after its own
step: the same warnings, the same count of ``--max-bad-steps`` in a row. What lags is only when
the stop happens: the run stops at the first read point at or after the step that made the count
(named in the message); the steps in between trained on (each non-finite one withheld, as before),
and no checkpoint is written after that step, since every save point is a read point.

With several processes the read point carries ONE small all-reduce (the non-finite flags of every
step since the last one, a signal on any rank, the main process's clock for time-based saves), so
every rank saves, skips or stops at the same step. A signal or a time-based save therefore waits for
the next read point (at most ``--log-every`` steps). With one process both are host values, looked
at after every step for free.

Non-finite losses (Goodfellow et al. 2016 §8.2 on exploding gradients; fp16 loss scaling is
Micikevicius et al. 2018): under fp16 the GradScaler already skips an update whose gradients
overflow (``skipped`` steps). Under bf16/fp32 ``train_step`` withholds the update itself, on the
device, when the all-reduced gradient norm is not finite, so the weights stay finite;
``--max-bad-steps`` such steps in a row stop the run. DeepSpeed applies its update inside
``backward``, before anyone can look, so there the first non-finite loss stops the run (at the next
read point, before anything is saved). Whatever happens, weights that are not finite are never
written: ``check_finite_weights`` runs before every checkpoint and the final save.
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
    read: Interval | None = None  # at a read point: the steps since the last one


@dataclass
class Interval:
    """The steps since the last read point, as read at this one."""

    loss_sum: torch.Tensor  # sums over this rank's steps whose loss and gradient were finite (on the device)
    correct: torch.Tensor
    count: int
    grad_norm: torch.Tensor | None  # the gradient norm of the newest such step (None: none had one)
    skipped: int  # steps whose update was withheld (fp16 overflow or non-finite gradients)


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
        self.pending: list[tuple[int, StepResult]] = []  # (step, result) since the last read point

    def after_step(self, step: int, result: StepResult, *, log: bool) -> Decision:
        """Keep the step's (device) flags; at a read point (``log``: the loop writes a train line after
        this step; a checkpoint is due; one process: a signal) read them all and decide."""
        acc = self.accelerator
        self.pending.append((step, result))
        scheduled = bool(self.every_steps and step % self.every_steps == 0)
        due = bool(self.every_seconds and acc.is_main_process
                   and time.monotonic() - self.last_save >= self.every_seconds)
        several = acc.num_processes > 1
        if not (log or scheduled or (not several and (due or self.stop_flag.requested))):
            return Decision(stop=False, save=False)
        stop, due, interval = self._read(self.stop_flag.requested, due)
        return Decision(stop=stop, save=stop or due or scheduled, read=interval)

    def _read(self, stop: bool, due: bool) -> tuple[bool, bool, Interval]:
        """The one host read of a read point (with several processes: one all-reduce first)."""
        acc, pending = self.accelerator, self.pending
        self.pending = []
        results = [r for _, r in pending]
        device = results[0].loss_sum.device
        losses = torch.stack([r.loss_sum for r in results])
        grad_bad = _column([r.nonfinite for r in results], device)
        withheld = _column([r.withheld for r in results], device)
        bad = ((~torch.isfinite(losses)).double() + grad_bad).clamp(max=1)
        if acc.num_processes > 1:  # any rank's non-finite loss counts for all; signals too; rank 0's clock
            flags = torch.cat([bad, torch.tensor([float(stop), float(due)], dtype=torch.float64).to(device)])
            flags = acc.reduce(flags, reduction="sum")
            bad, stop_due = flags[:-2].clamp(max=1), flags[-2:]
        else:
            stop_due = torch.tensor([float(stop), float(due)], dtype=torch.float64)
        host = torch.cat([bad, withheld, losses, stop_due.to(device)]).tolist()  # the one synchronisation
        n = len(results)
        bad_steps, withheld_steps, loss_values = host[:n], host[n:2 * n], host[2 * n:3 * n]
        for (step, _), was_bad, loss in zip(pending, bad_steps, loss_values):
            if was_bad:
                self._bad(step, loss)
            else:
                self.bad_in_a_row = 0
        keep = bad == 0
        good = [r for r, was_bad in zip(results, bad_steps) if not was_bad]
        norms = [r.grad_norm for r in good if r.grad_norm is not None]
        interval = Interval(
            loss_sum=torch.where(keep, losses, 0).sum(),
            correct=torch.where(keep, torch.stack([r.correct for r in results]).double(), 0).sum(),
            count=sum(r.count for r in good), grad_norm=norms[-1] if norms else None,
            skipped=int(sum(withheld_steps)))
        return host[-2] > 0, host[-1] > 0, interval

    def _bad(self, step: int, loss: float) -> None:
        self.bad_steps += 1
        self.bad_in_a_row += 1
        what = f"step {step}: the loss or gradient is not finite (loss sum {loss:.4g} on this rank)"
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


def _column(values: list, device: torch.device) -> torch.Tensor:
    """The steps' flags as float64 on the device: device flags are stacked there; host flags (None:
    no such flag; DeepSpeed's skipped answer is a host bool) become one small tensor, copied once."""
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([v.reshape(()).double() for v in values])
    if not any(isinstance(v, torch.Tensor) for v in values):
        return torch.tensor([float(bool(v)) for v in values], dtype=torch.float64).to(device)
    return torch.stack([v.reshape(()).double() if isinstance(v, torch.Tensor)
                        else torch.tensor(float(bool(v)), dtype=torch.float64).to(device) for v in values])


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
