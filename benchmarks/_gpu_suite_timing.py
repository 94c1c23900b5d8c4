"""How ``benchmarks/gpu_suite.py`` times things: windows of steps, the real training loop of
``resnet-scale train`` (:class:`LoopBench`), model FLOPs per image and honest precision labels.

A window is a block of steps with the device synchronised at both ends (no sync inside it, which
would stall the GPU's queue). A setting's figures are the median window and the slowest and
fastest one, over at least three windows. Warm-up (cuDNN autotuning, torch.compile, DataLoader
workers starting) runs before the first timed window and is a figure of its own: ``warmup_s``
is its wall time and ``warmup_extra_s`` the part of it beyond the steady-state step time (for a
compiled model, the compilation).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from resnet_scale.config import Config, add_config_arguments, config_from_args
from resnet_scale.memory import count_step_flops
from resnet_scale.models import build_resnet


def make_cfg(flags: list[str]) -> Config:
    """A Config from resnet-scale's own flags (the same parser the CLI generates)."""
    ap = argparse.ArgumentParser()
    add_config_arguments(ap)
    return config_from_args(ap.parse_args(flags))


def window_figures(rates: list[float], batch: int, steps_per_window: int) -> dict:
    """Median, slowest and fastest of per-window throughputs (images per second)."""
    if len(rates) < 1:
        raise ValueError("no timed window")
    med = statistics.median(rates)
    return {"windows": len(rates), "steps_per_window": steps_per_window, "batch": batch,
            "img_per_s": med, "img_per_s_min": min(rates), "img_per_s_max": max(rates),
            "spread": (max(rates) - min(rates)) / med, "ms_per_step": 1e3 * batch / med,
            "ms_per_image": 1e3 / med, "window_img_per_s": list(rates)}


def time_windows(step: Callable[[], None], *, warmup: int, windows: int, per_window: int, ops, batch: int,
                 before_timing: Callable[[], None] | None = None) -> dict:
    """``warmup`` untimed steps (their wall time is reported), ``before_timing()`` (e.g. draining
    a DataLoader's prefetched batches), then ``windows`` timed windows of ``per_window`` steps."""
    ops.sync()
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    ops.sync()
    warmup_s = time.perf_counter() - started
    if before_timing is not None:
        before_timing()
        ops.sync()
    ops.reset_peak()
    rates = []
    for _ in range(windows):
        started = time.perf_counter()
        for _ in range(per_window):
            step()
        ops.sync()
        rates.append(batch * per_window / (time.perf_counter() - started))
    fig = window_figures(rates, batch, per_window)
    peak = ops.peak()
    fig.update(warmup_steps=warmup, warmup_s=warmup_s,
               warmup_extra_s=max(0.0, warmup_s - warmup * fig["ms_per_step"] / 1e3),
               peak_gib=None if peak is None else peak / 2**30)
    return fig


def drain(batches: Iterator, count: int) -> int:
    """Take ``count`` batches and drop them: a DataLoader's workers fill their prefetch queue
    (num_workers x prefetch_factor batches) while the GPU warms up, and a timer started on a full
    queue would time the GPU eating ready-made batches, not the workers making them."""
    for _ in range(count):
        next(batches)
    return count


def precision_label(precision: str, device_type: str) -> str:
    """``fp32`` on a GPU is TF32 in every convolution (cuDNN's default) and in matmuls when
    torch.backends.cuda.matmul.allow_tf32 is on: say so, e.g. "fp32 (TF32 convs)"."""
    if precision != "fp32" or device_type != "cuda":
        return precision
    parts = [what for what, on in (("convs", torch.backends.cudnn.allow_tf32),
                                   ("matmuls", torch.backends.cuda.matmul.allow_tf32)) if on]
    return f"fp32 (TF32 {' and '.join(parts)})" if parts else "fp32"


@functools.lru_cache(maxsize=None)
def _flops(block: str, depth: int, stem: str, size: int, classes: int) -> float:
    with torch.device("meta"):
        model = build_resnet(block, depth, stem=stem, num_classes=classes)
    f = count_step_flops(model, 1, size)
    return float(f["forward"] + f["backward"])


def flops_per_image(spec: dict) -> float:
    """Model FLOPs of one training step per image (forward + backward, no recomputation)."""
    return _flops(spec["block"], spec["depth"], spec["stem"], spec["size"], spec["classes"])


def weights_format(model: torch.nn.Module) -> str:
    """The memory format the model's 4-D weights are in: NCHW, channels_last, mixed, or
    partitioned (ZeRO-3 keeps empty placeholders in the module)."""
    kinds = {"channels_last" if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
             else "NCHW" for p in model.parameters() if p.dim() == 4 and p.numel() > 0}
    return "partitioned" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"


def tensor_format(x: torch.Tensor) -> str:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "NCHW"


@contextlib.contextmanager
def compile_backend(name: str | None):
    """Make ``torch.compile`` use backend ``name`` while the model is built (the smoke run's
    "eager" backend runs torch.compile's code path without inductor's C++ compiler)."""
    if name in (None, "inductor"):
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=name)
    try:
        yield
    finally:
        torch.compile = original


class Stopped(BaseException):
    """The trainer's own SIGTERM handler asked the run to stop (BaseException: no section's
    ``except Exception`` may take it for a measuring error)."""


class LoopBench:
    """One ``resnet-scale train`` run, set up as the CLI sets it up (``set_up``), on synthetic data
    sized so that one epoch is the whole run (no short batch, no epoch boundary in a window).

    - :meth:`step_figures`: the run's own optimizer step (``Trainer._step``, the call its loop
      makes) on one resident batch from its loader, in windows after ``warmup`` steps;
    - :meth:`loop_figures`: the loop itself (``Trainer._train_epoch``: loader, step, metrics
      window, stop/save control, log lines) for ``(windows + 1) x per_window`` steps with
      ``--log-every per_window``; each metrics.jsonl train line is one window and the first is
      the warm-up. The end-of-run evaluation is left out: it is not training throughput, and
      under --compile it would compile the evaluation graph too.

    Leaving the ``with`` block closes the run (progress, tracker, files, signal handlers) and
    deletes its scratch folder, whatever happened. A SIGTERM that the trainer's own handler
    caught stops the run as it would stop a real one; it is raised again on the way out, for the
    suite's handler (which writes the partial report).
    """

    def __init__(self, flags: list[str], *, device: str, spec: dict, batch: int, timing: tuple[int, int, int],
                 ops, compile_with: str | None = None) -> None:
        self.warmup, self.windows, self.per_window = timing
        steps = self.per_window * (self.windows + 1)
        self.batch, self.ops, self.compile_with = batch, ops, compile_with
        self.flags = [*flags, "--device", device, "--tracker", "none", "--data", "synthetic",
                      "--synthetic-train-samples", str(batch * steps), "--synthetic-test-samples", str(batch),
                      "--synthetic-classes", str(spec["classes"]), "--max-steps", str(steps),
                      "--log-every", str(self.per_window), "--run-name", "bench"]
        self.scratch: Path | None = None  # the run's --output-dir, made on entering
        self.run = self.trainer = self.batch_xy = None
        self.setup_s = 0.0

    def __enter__(self) -> "LoopBench":
        from accelerate.state import AcceleratorState

        from resnet_scale.train.setup import set_up
        from resnet_scale.train.trainer import Trainer

        try:
            self.scratch = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
            AcceleratorState._reset_state(True)  # one Accelerator per run, in one process
            torch._dynamo.reset()  # compile_s is a cold compilation, as in a new process
            started = time.perf_counter()
            with compile_backend(self.compile_with):
                self.run = set_up(make_cfg([*self.flags, "--output-dir", str(self.scratch)]))
            self.setup_s = time.perf_counter() - started
            self.trainer = Trainer(self.run)
            self.run.train_loader.set_epoch(0)
            self.batch_xy = next(iter(self.run.train_loader))
        except BaseException:
            self._close()
            raise
        return self

    def step(self) -> None:
        """One optimizer step of the run on its resident batch (the step-only figure)."""
        if self.trainer.control.stop_flag.requested:
            raise Stopped()
        self.trainer._step(*self.batch_xy)

    def step_figures(self) -> dict:
        return time_windows(self.step, warmup=self.warmup, windows=self.windows, per_window=self.per_window,
                            ops=self.ops, batch=self.batch)

    def loop_figures(self) -> dict:
        from resnet_scale.train.checkpoint import Preempted

        self.ops.reset_peak()
        try:
            self.trainer._train_epoch(0, 0)
        except Preempted:
            raise Stopped() from None
        peak = self.ops.peak()
        self.run.folder.close()  # flushes metrics.jsonl
        lines = (self.run.folder.path / "metrics.jsonl").read_text().splitlines()
        train = [r for r in map(json.loads, lines) if r.get("split") == "train"]
        if len(train) != self.windows + 1:
            raise RuntimeError(f"expected {self.windows + 1} train lines in metrics.jsonl, found {len(train)}")
        fig = window_figures([r["images_per_s"] for r in train[1:]], self.batch, self.per_window)
        first_s = train[0]["step_time_s"] * train[0]["step"]
        fig.update(warmup_steps=train[0]["step"], warmup_s=first_s, setup_s=self.setup_s,
                   warmup_extra_s=max(0.0, first_s - train[0]["step"] * fig["ms_per_step"] / 1e3),
                   peak_gib=None if peak is None else peak / 2**30)
        return fig

    def __exit__(self, exc_type, exc, tb) -> bool:
        stopped = exc_type is Stopped or bool(self.trainer and self.trainer.control.stop_flag.requested)
        self._close()
        if stopped:  # the trainer's handler swallowed a SIGTERM: hand it to the suite's
            signal.raise_signal(signal.SIGTERM)
        return False

    def _close(self) -> None:
        from accelerate.state import AcceleratorState

        try:
            if self.trainer is not None:
                self.trainer._close()  # also puts the suite's signal handlers back
            elif self.run is not None:
                self.run.folder.close()
        finally:
            self.run = self.trainer = self.batch_xy = None
            AcceleratorState._reset_state(True)
            if self.scratch is not None:
                shutil.rmtree(self.scratch, ignore_errors=True)
            self.ops.free()
