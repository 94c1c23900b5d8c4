"""GPU benchmark suite: resnet_scale's speed and memory claims, measured on one GPU.

    python benchmarks/gpu_suite.py [--out docs/benchmarks] [--smoke] [--sections 1,2,3,4,5,6] [--profile]
                                   [--time-limit SECONDS]

Writes ``gpu-<date>.md`` and ``gpu-<date>.json`` to ``--out`` (default ``docs/benchmarks``): the
device, driver, torch version, every setting, every figure next to its goal (met / missed / not
measured), and a plain list of the missed goals. Both files are written when the run starts,
again after every section, and on SIGTERM, SIGINT or ``--time-limit``: a run stopped halfway
keeps what it measured, says where it stopped, and exits non-zero (128 + the signal; 124 for
the time limit). Step counts are sized so that the whole suite should take about 6 minutes on
one H100/H200 (an estimate: two inductor compilations are most of it; no GPU has run it yet);
elapsed time per section is recorded.

1. CIFAR-stem ResNet-18, 32 px, batch 512: the seed-style baseline (fp32 NCHW eager, PIL
   transforms in DataLoader workers) vs ``resnet-scale train`` (DeviceLoader, bf16,
   channels_last), eager and compiled. Goals: >= 3x the baseline; MFU >= 15 % eager, >= 25 %
   compiled; >= 30,000 img/s eager, >= 45,000 compiled.
2. ResNet-50, 224 px, batch 256, synthetic: ``resnet-scale train`` in fp32, fp16 + loss scaling,
   bf16 + channels_last eager and compiled. Goals: >= 3,500 img/s eager, >= 5,000 compiled, MFU
   >= 20 % compiled.
3. Memory, ResNet-50 224 px: peak per image and time per image for fp32, bf16+CL and
   checkpointing stage/block/sqrt; largest batch in 8 GiB, fp32 vs --low-memory.
   Goal: >= 4x the batch at <= 1.35x the time per image of bf16+CL.
4. One GPU, ResNet-50 bf16: DDP vs DeepSpeed ZeRO-2 / ZeRO-3 step time, like for like (same
   weights' memory format, same inputs). Goals: <= 1.10x, <= 1.30x. Needs ``import deepspeed``
   to work; otherwise the section is skipped with the ImportError's text.
5. The planner's predicted peak vs the peaks measured in 3 and 4. Goal: within +-15 %.
6. Activation compression, ResNet-50 224 px, batch 128: bf16 + channels_last with
   ``--activation-compression int8|int4|int2`` (``--smoke``: int2 only) vs without: time per image
   and peak memory.
   Goal: <= 1.5x the time per image.

Throughput rows time the real loop of ``resnet-scale train`` and, beside it, the same run's step
alone (``loop_vs_step``); every row is at least three timed windows (median, slowest, fastest)
after a warm-up that is reported apart (``warmup_s``; ``compile_s`` for compiled rows), with
achieved TFLOP/s and MFU (of the device's dense bf16 peak). ``--smoke`` runs every section's code
on the CPU at tiny sizes (CI); figures that need CUDA are "not measured". ``--profile``: for every
missed goal, a short torch.profiler table (top ops by CUDA time) goes into the md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for p in (HERE, ROOT):  # the helpers beside this file; resnet_scale from a checkout
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from _gpu_suite_report import MISS, Goal, machine, missed, write_report  # noqa: E402

_R18 = {"name": "ResNet-18", "block": "basic", "depth": 18, "stem": "cifar", "size": 32, "classes": 10}
_R50 = {"name": "ResNet-50", "block": "bottleneck", "depth": 50, "stem": "imagenet", "size": 224, "classes": 1000}
_TINY = {"name": "basic-8 (smoke)", "block": "basic", "depth": 8, "stem": "cifar", "size": 16, "classes": 10}

#: One H100/H200, about 6 minutes (estimated). ``*_timing``: (warm-up steps, timed windows, steps per window);
#: a loop run is (windows + 1) x steps-per-window steps, its first window the warm-up.
#: ``compile_warmup``: extra warm-up steps of compiled rows. ``*_steps``: (warm-up, timed) steps.
FULL = {
    "cifar": {**_R18, "batch": 512}, "cifar_samples": 50_000, "cifar_timing": (10, 5, 20),
    "baseline_workers": 8, "compile_backend": "inductor", "compile_warmup": 3,
    "r50": {**_R50, "batch": 256}, "r50_timing": (5, 4, 5),
    "mem": {**_R50, "batch": 128}, "mem_steps": (3, 10), "limit_gib": 8.0, "max_batch": 2048,
    "zero": {**_R50, "batch": 128}, "zero_timing": (5, 3, 5),
    "comp": {**_R50, "batch": 128}, "comp_timing": (3, 3, 5), "comp_modes": ("none", "int8", "int4", "int2"),
}
#: CPU, CI: depth 8, 16 px, batch 8, three windows of one or two steps. torch.compile with the
#: "eager" backend (the code path without inductor's C++ compile); DeepSpeed runs on CPU over gloo.
SMOKE = {
    "cifar": {**_TINY, "batch": 8}, "cifar_samples": 64, "cifar_timing": (1, 3, 2),
    "baseline_workers": 2, "compile_backend": "eager", "compile_warmup": 0,
    "r50": {**_TINY, "batch": 8}, "r50_timing": (1, 3, 1),
    "mem": {**_TINY, "batch": 8}, "mem_steps": (1, 3), "limit_gib": 8.0, "max_batch": 64,
    "zero": {**_TINY, "batch": 8}, "zero_timing": (1, 3, 1),
    "comp": {**_TINY, "batch": 8}, "comp_timing": (1, 3, 1), "comp_modes": ("none", "int2"),
}
SECTIONS = {"1": "cifar", "2": "r50", "3": "memory", "4": "zero", "5": "planner", "6": "compression"}
#: After a stop signal, the seconds cleanup may take before the process leaves anyway.
GRACE_S = 30.0


class Interrupted(BaseException):
    """A stop signal or the time limit (BaseException: no section's ``except Exception`` takes it)."""

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


class Profiler:
    """``profile(goals, step, label)``: with --profile and a missed goal among ``goals``, run
    ``step`` a few times under torch.profiler and keep the top ops (by CUDA time on a GPU) in the
    current section's ``profiles``."""

    def __init__(self, enabled: bool, cuda: bool, steps: int = 3) -> None:
        self.enabled, self.cuda, self.steps, self.section = enabled, cuda, steps, None

    def __call__(self, goals: list[Goal], step, label: str) -> None:
        if not self.enabled or not any(g.status == MISS for g in goals) or self.section is None:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(self.steps):
                step()
            if self.cuda:
                torch.cuda.synchronize()
        sort = "cuda_time_total" if self.cuda else "cpu_time_total"
        text = prof.key_averages().table(sort_by=sort, row_limit=15)
        self.section.setdefault("profiles", {})[f"{label} ({self.steps} steps, by {sort})"] = text


def parse_sections(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in SECTIONS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"--sections {text!r}: choose from {','.join(SECTIONS)}")
    return sorted(set(keys))


class Suite:
    """The sections in order, the report written after each, and the stop signals' handler."""

    def __init__(self, args, cfg: dict, device: str, command: str) -> None:
        self.args, self.cfg, self.device, self.command = args, cfg, device, command
        self.now = dt.datetime.now(dt.timezone.utc)
        self.stem = f"gpu-{self.now.date().isoformat()}"
        self.started, self.goals, self.sections = time.perf_counter(), [], {}
        self.current: tuple[str, dict, float] | None = None  # the section being measured
        self.interrupted: str | None = None
        self.stop_code = 0  # the exit status of the stop signal, once one came
        self.machine = machine(device)
        self.failed = False
        self.watchdog: threading.Timer | None = None

    def report(self) -> dict:
        settings = dict(self.cfg)
        settings.update(device=self.device, smoke=self.args.smoke, sections=self.args.sections,
                        profile=self.args.profile, time_limit_s=self.args.time_limit,
                        torch_threads=torch.get_num_threads(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                        timing_note="*_timing: (warm-up steps, timed windows, steps per window); "
                                    "*_steps: (warm-up, timed) steps")
        sections = dict(self.sections)
        if self.current is not None and self.interrupted:
            key, sec, t0 = self.current
            sections[key] = {**sec, "interrupted": self.interrupted, "wall_s": time.perf_counter() - t0}
        return {"benchmark": "gpu_suite", "date": self.now.isoformat(timespec="seconds"), "smoke": self.args.smoke,
                "command": self.command, "machine": self.machine, "settings": settings,
                "wall_s": time.perf_counter() - self.started,
                "complete": self.interrupted is None and len(self.sections) == len(self.args.sections),
                "interrupted": self.interrupted, "sections": sections, "goals": [g.as_dict() for g in self.goals],
                "missed": [g.describe() for g in missed(self.goals)]}

    def write(self) -> tuple[Path, Path]:
        return write_report(self.args.out, self.stem, self.report())

    def where(self, what: str) -> str:
        section = f" during section {self.current[0]} ({SECTIONS[self.current[0]]})" if self.current else ""
        return f"{what}{section} after {time.perf_counter() - self.started:.1f} s"

    def on_signal(self, signum, frame) -> None:
        code = 124 if signum == signal.SIGALRM else 128 + signum
        if self.interrupted is not None:  # a second signal: leave now (the partial report is on disk)
            os._exit(code)
        self.interrupted = self.where(f"time limit of {self.args.time_limit:g} s reached" if signum == signal.SIGALRM
                                      else f"stopped by {signal.Signals(signum).name}")
        self.stop_code = code
        md, _ = self.write()
        print(f"[gpu_suite] {self.interrupted}; partial report in {md}", file=sys.stderr, flush=True)
        self.watchdog = threading.Timer(GRACE_S, os._exit, (code,))  # cleanup must not keep it alive
        self.watchdog.daemon = True
        self.watchdog.start()
        raise Interrupted(self.interrupted, code)

    def stop_if_asked(self) -> None:
        """Raise the stop again if one came but its Interrupted was swallowed: a handler's exception
        raised inside a weakref callback or ``__del__`` (a garbage collection in torch's code) is
        printed as "Exception ignored" and the code under it goes on."""
        if self.interrupted is not None:
            raise Interrupted(self.interrupted, self.stop_code)

    def run(self, runners: dict, prof: Profiler, ops) -> None:
        self.write()
        for key in self.args.sections:
            self.stop_if_asked()
            t0 = time.perf_counter()
            print(f"[gpu_suite] section {key} ({SECTIONS[key]}) ...", flush=True)
            sec = prof.section = {"title": SECTIONS[key], "rows": []}
            self.current = (key, sec, t0)
            try:
                runners[key](sec)
            except Exception:  # noqa: BLE001 -- record it, run the other sections
                self.failed = True
                sec["error"] = traceback.format_exc()
                print(sec["error"], file=sys.stderr)
            finally:
                ops.free()
            self.stop_if_asked()  # still the current section: the report marks it interrupted
            sec["wall_s"] = time.perf_counter() - t0
            self.sections[key], self.current = sec, None
            md, _ = self.write()
            total = time.perf_counter() - self.started
            print(f"[gpu_suite] section {key}: {sec['wall_s']:.1f} s (total {total:.1f} s); wrote {md}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks", help="folder for gpu-<date>.md/.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, a few steps (CI)")
    ap.add_argument("--sections", type=parse_sections, default=list(SECTIONS), help="e.g. 1,2,6 (default: all)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table for each missed goal")
    ap.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="stop this long after the start (imports not counted), keeping the partial report "
                         "(exit 124)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when there is one (cpu with --smoke)")
    args = ap.parse_args(argv)
    device = args.device if args.device != "auto" else ("cpu" if args.smoke or not torch.cuda.is_available()
                                                        else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if device == "cpu" and not args.smoke:
        print("[gpu_suite] no CUDA GPU: full sizes on the CPU take hours; use --smoke", file=sys.stderr)
        return 2
    if args.time_limit is not None and not args.time_limit > 0:
        ap.error(f"--time-limit {args.time_limit}: give a positive number of seconds")
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.smoke:
        torch.set_num_threads(1)  # tiny models on a shared CI machine: one thread is fastest
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer: fixed shapes, fastest kernels

    from _gpu_suite_compression import run_compression
    from _gpu_suite_memory import _memory_module, run_memory, run_planner, run_zero
    from _gpu_suite_speed import run_cifar, run_r50

    command = " ".join(["python benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)])
    suite = Suite(args, cfg, device, command)
    ops = _memory_module().Ops(device)
    prof = Profiler(args.profile, ops.cuda)
    goals = suite.goals
    runners = {"1": lambda sec: run_cifar(cfg, ops, goals, prof, sec),
               "2": lambda sec: run_r50(cfg, ops, goals, prof, sec),
               "3": lambda sec: run_memory(cfg, ops, goals, prof, sec),
               "4": lambda sec: run_zero(cfg, ops, goals, prof, sec),
               "5": lambda sec: run_planner(cfg, suite.sections, goals, device, sec),
               "6": lambda sec: run_compression(cfg, ops, goals, prof, sec)}
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)
    previous = {sig: signal.signal(sig, suite.on_signal) for sig in stops}
    if args.time_limit:  # counted from the suite's start, as its report's clock
        signal.setitimer(signal.ITIMER_REAL, max(1e-3, args.time_limit - (time.perf_counter() - suite.started)))
    try:
        suite.run(runners, prof, ops)
    except Interrupted as stop:
        md, js = suite.write()  # what the cleanup left as it was, and the final wall time
        print(f"[gpu_suite] {stop.reason}; wrote the partial report {md} and {js}", file=sys.stderr)
        return stop.code
    except KeyboardInterrupt:  # a Ctrl-C that a handler of the code under test turned into this
        suite.interrupted = suite.interrupted or suite.where("stopped by SIGINT (KeyboardInterrupt)")
        md, js = suite.write()
        print(f"[gpu_suite] {suite.interrupted}; wrote the partial report {md} and {js}", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    md, js = suite.write()
    print("\n".join(["[gpu_suite] goals:"] + [f"  {g.describe()}" for g in goals]))
    total = time.perf_counter() - suite.started
    print(f"[gpu_suite] missed: {len(missed(goals))}; wrote {md} and {js} in {total:.1f} s")
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
