"""GPU benchmark suite: resnet_scale's speed and memory claims, measured on one GPU.

    python benchmarks/gpu_suite.py [--out docs/benchmarks] [--smoke] [--sections 1,2,3,4,5] [--profile]

Writes ``gpu-<date>.md`` and ``gpu-<date>.json`` to ``--out`` (default ``docs/benchmarks``):
the device, driver, torch version, every setting, every figure next to its goal with PASS/MISS,
and a plain list of the missed goals. Step counts are fixed and sized so that the whole suite
finishes in under 8 minutes on one H100 (elapsed time per section is printed and recorded).

1. CIFAR-stem ResNet-18, 32 px, batch 512: the common example's baseline (fp32, NCHW, eager,
   PIL/CPU transforms in DataLoader workers) vs resnet_scale (DeviceLoader, bf16, channels_last),
   eager and compiled. Goals: >= 30,000 img/s eager, >= 45,000 compiled, >= 10x the baseline.
2. ResNet-50, 224 px, batch 256, synthetic: fp32; AMP fp16 NCHW + GradScaler; bf16 +
   channels_last eager and compiled. Goals: >= 3,500 img/s eager, >= 5,000 compiled.
3. Memory, ResNet-50 224 px: peak per image and time per image for fp32, bf16+CL and
   checkpointing stage/block/sqrt; largest batch in 8 GiB, fp32 vs --low-memory.
   Goal: >= 4x the batch at <= 1.35x the time per image of bf16+CL.
4. One GPU, ResNet-50 bf16: DDP vs DeepSpeed ZeRO-2 / ZeRO-3 step time. Goals: <= 1.10x, <= 1.30x.
5. The planner's predicted peak vs the peaks measured in 3 and 4. Goal: within +-15 %.

Steady state only: warm-up steps (cuDNN autotuning, compilation, worker start-up) are not timed,
and the GPU is synchronised on both sides of each timed block. ``--smoke`` runs every section's
code on the CPU at tiny sizes (CI); figures that need CUDA are recorded as n/a. ``--profile``:
for every missed goal, a short torch.profiler table (top ops by CUDA time) goes into the md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
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

#: Sized for one H100 (about 6 minutes with compilation): (warm-up, timed) steps per config.
FULL = {
    "cifar": {**_R18, "batch": 512}, "cifar_samples": 97 * 512, "cifar_steps": (10, 97),  # 97 steps ~ one CIFAR epoch
    "baseline_workers": 8, "compile_backend": "inductor", "compile_warmup": 3,
    "r50": {**_R50, "batch": 256}, "r50_steps": (5, 20),
    "mem": {**_R50, "batch": 128}, "mem_steps": (3, 10), "limit_gib": 8.0, "max_batch": 2048,
    "zero": {**_R50, "batch": 128}, "zero_steps": (5, 15),
}
#: CPU, CI: depth 8, 16 px, batch 8, 1 warm-up + 2 timed steps. torch.compile with the "eager"
#: backend (the code path without inductor's C++ compile); DeepSpeed runs on CPU over gloo.
SMOKE = {
    "cifar": {**_TINY, "batch": 8}, "cifar_samples": 64, "cifar_steps": (1, 2),
    "baseline_workers": 2, "compile_backend": "eager", "compile_warmup": 0,
    "r50": {**_TINY, "batch": 8}, "r50_steps": (1, 2),
    "mem": {**_TINY, "batch": 8}, "mem_steps": (1, 2), "limit_gib": 8.0, "max_batch": 64,
    "zero": {**_TINY, "batch": 8}, "zero_steps": (1, 2),
}
SECTIONS = {"1": "cifar", "2": "r50", "3": "memory", "4": "zero", "5": "planner"}


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks", help="folder for gpu-<date>.md/.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, a few steps (CI)")
    ap.add_argument("--sections", type=parse_sections, default=list(SECTIONS), help="e.g. 1,2,5 (default: all)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table for each missed goal")
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
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.smoke:
        torch.set_num_threads(1)  # tiny models on a shared CI machine: one thread is fastest
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer: fixed shapes, fastest kernels

    from _gpu_suite_memory import _memory_module, run_memory, run_planner, run_zero
    from _gpu_suite_speed import run_cifar, run_r50

    ops = _memory_module().Ops(device)
    started, goals, sections = time.perf_counter(), [], {}
    prof = Profiler(args.profile, ops.cuda)
    runners = {"1": lambda: run_cifar(cfg, ops, goals, prof), "2": lambda: run_r50(cfg, ops, goals, prof),
               "3": lambda: run_memory(cfg, ops, goals, prof), "4": lambda: run_zero(cfg, ops, goals, prof),
               "5": lambda: run_planner(cfg, sections, goals, device)}
    failed = False
    for key in args.sections:
        t0 = time.perf_counter()
        print(f"[gpu_suite] section {key} ({SECTIONS[key]}) ...", flush=True)
        prof.section = {}
        try:
            sec = runners[key]()
        except Exception:  # noqa: BLE001 -- record it, run the other sections
            sec, failed = {"title": SECTIONS[key], "error": traceback.format_exc(), "rows": []}, True
            print(sec["error"], file=sys.stderr)
        sec.update(prof.section)
        sec["wall_s"] = time.perf_counter() - t0
        sections[key] = sec
        ops.free()
        print(f"[gpu_suite] section {key}: {sec['wall_s']:.1f} s "
              f"(total {time.perf_counter() - started:.1f} s)", flush=True)
    now = dt.datetime.now(dt.timezone.utc)
    settings = {k: v for k, v in cfg.items()}
    settings.update(device=device, smoke=args.smoke, sections=args.sections, profile=args.profile,
                    torch_threads=torch.get_num_threads(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    steps_note="(warm-up, timed) steps per configuration")
    report = {"benchmark": "gpu_suite", "date": now.isoformat(timespec="seconds"), "smoke": args.smoke,
              "command": " ".join(["python benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine": machine(device), "settings": settings, "wall_s": time.perf_counter() - started,
              "sections": sections, "goals": [g.as_dict() for g in goals],
              "missed": [g.describe() for g in missed(goals)]}
    md, js = write_report(args.out, f"gpu-{now.date().isoformat()}", report)
    print("\n".join(["[gpu_suite] goals:"] + [f"  {g.describe()}" for g in goals]))
    print(f"[gpu_suite] missed: {len(report['missed'])}; wrote {md} and {js} in {report['wall_s']:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
