"""The training loop: :func:`train` sets a run up (``setup.py``), runs its epochs here and finishes
it (``finish.py``).

The loop touches the framework at a few named seams only: ``prepare`` (in the setup), ``backward``
(in ``step.py``), ``reduce`` (metrics over ranks) and ``wait_for_everyone``, so the same code runs in
one process, under DDP and under DeepSpeed. Everything it counts lives in one
:class:`~resnet_scale.train.state.LoopState`: saved in every checkpoint, the starting point of a
resumed run, and the source of the summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from resnet_scale.config import Config
from resnet_scale.distributed.accelerator import world_size_from_env
from resnet_scale.train.checkpoint import Preempted, checkpoint_dirs, save_checkpoint
from resnet_scale.train.control import (LoopControl, NonFiniteError, check_finite_weights, requeue_slurm_job,
                                        resume_advice)
from resnet_scale.train.finish import finish, save_best
from resnet_scale.train.metrics import Window, broadcast_buffers, evaluate, peak_memory_bytes, reduce_sums
from resnet_scale.train.oom import step_with_recovery
from resnet_scale.train.process_state import isolated_run
from resnet_scale.train.resume import RunFinished
from resnet_scale.train.setup import Run, set_up
from resnet_scale.train.step import BufferSnapshot, StepResult, train_step


def train(cfg: Config, *, given: frozenset[str] | None = None,
          overrides: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Train as ``cfg`` says, in this process (or in each process of a ``torchrun`` / ``accelerate
    launch`` job), and return the run's summary: final and best test accuracy, final test loss,
    wall time, images/s, steps, the memory settings used, ``run_dir``, ... (also written to
    ``<output_dir>/<run_name>/summary.json``, beside ``config.json``, ``metrics.jsonl`` and
    ``model.safetensors``). With ``--resume auto`` of a finished run: its summary, nothing changed.

    Callable any number of times in one process, with any settings (fp32 then bf16, DDP then ZeRO):
    what a run changes in the process (Accelerate's state, environment variables, torch's switches,
    random generators, the logger's level, signal handlers, a process group it started) is put back
    when it returns or raises (``process_state.py``). Raises ConfigError (bad settings; nothing
    written), DataError, and in the loop NonFiniteError / Preempted (a checkpoint was saved).

    ``given`` / ``overrides`` serve ``resnet-scale train --resume``: the settings the command named
    (None: all of ``cfg``) and those a resumed run may change (``set_up``).
    """
    with isolated_run(world_size_from_env()) as outcome:
        try:
            run = set_up(cfg, given=given, overrides=overrides)
        except RunFinished as done:
            outcome.finished = True
            return done.summary
        trainer = Trainer(run)
        try:
            trainer.fit()
        finally:
            trainer.control.close()  # the loop's signal handlers, whatever ended it
        summary = finish(trainer.run, trainer.state, oom_events=trainer.oom_events, seen_samples=trainer.seen_samples)
        outcome.finished = True
        return summary


class Trainer:
    """Runs the epochs of a set-up :class:`Run`, counting in ``run.state``."""

    def __init__(self, run: Run):
        self.run, self.state = run, run.state
        cfg = run.cfg
        self.started = time.perf_counter() - self.state.elapsed  # the run's clock, earlier attempts included
        self.grad_norm = self.state.last_grad_norm  # a device tensor between log lines: no sync per step
        self.window = Window.new(run.accelerator.device)  # sums of the log interval in progress
        self.oom_events: list[dict[str, int]] = []  # plan switches after out-of-memory errors (--oom-recovery)
        self.seen_samples: dict[int, list[int]] = {}  # epoch -> dataset indices this process trained on
        self.control = LoopControl(run.accelerator, every_steps=cfg.train.checkpoint_every,
                                   every_minutes=cfg.train.checkpoint_every_minutes,
                                   max_bad_steps=cfg.train.max_bad_steps, deepspeed=cfg.engine() == "deepspeed",
                                   bad_steps=self.state.bad_steps, advice=self._advice)
        self.sync_buffers = cfg.engine() == "deepspeed" and run.accelerator.num_processes > 1
        # A withheld update also puts BatchNorm's statistics back (DeepSpeed updates inside backward).
        self.snapshot = BufferSnapshot(run.model) if cfg.engine() != "deepspeed" else None

    def fit(self) -> None:
        """Every epoch from where the state stands: train, evaluate, save at the epoch's end."""
        run, state, t = self.run, self.state, self.run.cfg.train
        start_epoch, skip = state.epoch, state.epoch_step
        run.model.train()
        for epoch in range(start_epoch, run.epochs):
            epoch_start = time.perf_counter()
            self._train_epoch(epoch, skip if epoch == start_epoch else 0)
            is_last = state.step == run.total_steps
            if (epoch + 1) % t.eval_every == 0 or is_last:
                self._evaluate(epoch, epoch_start)
            if (t.checkpoint_every or t.checkpoint_every_minutes) and not is_last:
                state.epoch, state.epoch_step = epoch + 1, 0
                self.window = Window.new(run.accelerator.device)
                self._save()
            if is_last:
                break
        run.progress.close()
        self.control.close()
        self._sync()

    def _train_epoch(self, epoch: int, skip: int) -> None:
        """One epoch's steps after its first ``skip`` batches: step, log, then save or stop as decided."""
        run, state, t = self.run, self.state, self.run.cfg.train
        run.train_loader.set_epoch(epoch)
        batches = run.train_loader.epoch_indices() if run.cfg.distributed.record_samples else None
        self.window = Window.new(run.accelerator.device)
        if skip:  # resumed mid-epoch: the window of the interrupted log interval comes back too
            self.window.restore(state.window, sums=run.accelerator.is_main_process)  # saved: summed over ranks
        if state.step >= run.total_steps:  # resumed from the run's last step: nothing left to train
            return
        for epoch_step, (images, labels) in enumerate(run.train_loader, start=1):
            if epoch_step <= skip:  # the loader is deterministic per (seed, epoch): skip what was trained
                continue
            result = self._step(images, labels)
            state.step += 1
            state.epoch, state.epoch_step = epoch, epoch_step
            run.scheduler.step()  # the schedule follows the step (a withheld update too): no host read per step
            log = state.step % t.log_every == 0 or state.step == run.total_steps or epoch_step == run.steps_per_epoch
            try:  # flags stay on the device until a read point (a log line, a save, a stop): see control.py
                decision = self.control.after_step(state.step, result, log=log)
            except NonFiniteError:  # too many bad steps: close what is open; nothing non-finite is saved
                self._close()
                raise
            if decision.read is not None:  # the finite steps since the last read point join the window
                self._add(decision.read)
            if batches is not None:
                self.seen_samples.setdefault(epoch, []).extend(batches[epoch_step - 1].tolist())
            if log:
                self._log_train(epoch, epoch_step)
            else:
                run.progress.update(state.step, epoch + 1, {}, log_line=False)
            if decision.save:
                saved_at = self._save()
                if decision.stop:
                    self._close()
                    if t.requeue and run.accelerator.is_main_process:
                        run.progress.message(requeue_slurm_job())
                    raise Preempted(saved_at)
            if state.step == run.total_steps:
                break

    def _add(self, read) -> None:
        """Count the steps of a read point's interval: window sums, newest gradient norm, withheld updates."""
        self.window.add(read.loss_sum, read.correct, read.count)
        self.grad_norm = read.grad_norm if read.grad_norm is not None else self.grad_norm
        self.state.skipped += read.skipped

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """One optimizer step; with --oom-recovery, redone with smaller micro-batches until it fits."""
        run, cfg = self.run, self.run.cfg
        common = dict(label_smoothing=cfg.optim.label_smoothing, offload=run.offload,
                      max_grad_norm=cfg.optim.max_grad_norm, buffers=self.snapshot)
        if not cfg.memory.oom_recovery:
            return train_step(run.accelerator, run.model, run.optimizer, images, labels,
                              accumulation_steps=run.memory.accumulation_steps, **common)
        result, run.memory = step_with_recovery(run.accelerator, run.model, run.optimizer, images, labels,
                                                step=self.state.step + 1, memory=run.memory, events=self.oom_events,
                                                say=run.progress.message, **common)
        return result

    def _log_train(self, epoch: int, epoch_step: int) -> None:
        """The train line of the steps since the last one (summed over ranks); a new window starts."""
        run, state, window = self.run, self.state, self.window
        # One host read: the window's sums over ranks and the newest gradient norm (NaN: none yet)
        norm = self.grad_norm if isinstance(self.grad_norm, torch.Tensor) else torch.tensor(
            float("nan") if self.grad_norm is None else self.grad_norm)
        loss_sum, correct, count, grad_norm = reduce_sums(run.accelerator, window.loss_sum, window.correct,
                                                          window.count, local=norm)
        if count:  # else every step since the last line was non-finite: nothing to average
            elapsed = time.perf_counter() - window.started
            state.train_time += elapsed
            state.train_images += int(count)
            record = {
                "step": state.step, "epoch": epoch + epoch_step / run.steps_per_epoch, "split": "train",
                "loss": loss_sum / count, "accuracy": correct / count,
                "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": count / elapsed,
                "step_time_s": elapsed / (state.step - state.last_logged_step),
                "time_s": time.perf_counter() - self.started,
                "grad_norm": grad_norm if self.grad_norm is not None else None,
            }
            state.last_logged_step = state.step
            self._record(record)
            run.progress.update(state.step, epoch + 1, {"loss": record["loss"], "acc": record["accuracy"],
                                                        "img/s": record["images_per_s"]}, log_line=True)
        self.window = Window.new(run.accelerator.device)

    def _evaluate(self, epoch: int, epoch_start: float) -> None:
        """The test split after ``epoch``: best accuracy, time to target, one test line."""
        run, state, t = self.run, self.state, self.run.cfg.train
        if self.sync_buffers:
            broadcast_buffers(run.model, run.accelerator)
        first = state.last_eval is None  # (a resumed run's state holds the evaluations before the checkpoint)
        state.last_eval = evaluate(run.model, run.test_loader, run.accelerator)
        if first or state.last_eval["accuracy"] > state.best:  # the same on every rank: the sums are reduced
            state.best = state.last_eval["accuracy"]
            save_best(run, state, epoch)
        record = {"step": state.step, "epoch": epoch + 1, "split": "test", "loss": state.last_eval["loss"],
                  "accuracy": state.last_eval["accuracy"], "lr": run.optimizer.param_groups[0]["lr"],
                  "images_per_s": None, "samples": state.last_eval["samples"],
                  "epoch_time_s": time.perf_counter() - epoch_start, "time_s": time.perf_counter() - self.started,
                  "peak_memory_bytes": peak_memory_bytes(run.accelerator.device)}
        if t.target_accuracy is not None and state.time_to_target is None and record["accuracy"] >= t.target_accuracy:
            state.time_to_target = record["time_s"]
        self._record(record)
        run.progress.message(
            f"epoch {epoch + 1}/{run.epochs}: test loss {record['loss']:.4f} "
            f"accuracy {record['accuracy']:.2%} (best {state.best:.2%}) in {record['epoch_time_s']:.1f}s"
        )

    def _record(self, record: dict[str, Any]) -> None:
        if self.run.accelerator.is_main_process:
            self.run.folder.log(record)
        self.run.tracker.log(record, step=self.state.step)  # a no-op off the main process

    def _sync(self) -> None:
        """Copy into the state what other objects hold: the clock, the newest gradient norm (read from
        the device now), the metrics lines written, the bad-step count and the tracker's run id."""
        state = self.state
        state.elapsed = time.perf_counter() - self.started
        state.last_grad_norm = None if self.grad_norm is None else float(self.grad_norm)
        state.metrics_lines = self.run.folder.lines_written
        state.bad_steps = self.control.bad_steps
        state.tracker_run_id = self.run.tracker.run_id

    def _save(self) -> Path:
        """A checkpoint from which a resumed run continues at the next batch with identical metrics."""
        run, state = self.run, self.state
        self._sync()
        state.window = self.window.snapshot(run.accelerator)
        if self.sync_buffers:  # the saved statistics are rank 0's: every rank resumes with the same ones
            broadcast_buffers(run.model, run.accelerator)
        check_finite_weights(run.model, run.accelerator, f"the checkpoint of step {state.step}", self._advice())
        saved_at = save_checkpoint(run.accelerator, run.folder.path, state.step, state, run.cfg.train.keep_checkpoints)
        self.control.saved()
        return saved_at

    def _advice(self, first_bad: int | None = None) -> str:
        """After a non-finite stop: what to change, and the checkpoint to resume from."""
        return resume_advice(self.run.cfg, self.run.memory.precision, checkpoint_dirs(self.run.folder.path), first_bad)

    def _close(self) -> None:
        """Close what is open when the run stops early (pre-empted, or non-finite)."""
        self.run.progress.close(), self.run.tracker.finish(), self.run.folder.close(), self.control.close()
