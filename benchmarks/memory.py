"""Memory benchmark: what each memory switch of resnet_scale costs and saves.

    python benchmarks/memory.py [--out docs/benchmarks] [--smoke] [--device cpu|cuda] [--limit-gib 8]

Writes ``memory.md`` and ``memory.json`` to ``--out`` (default ``docs/benchmarks``) and prints
the tables. Three sections; docs/memory.md is the guide that reads them. The settings' labels,
the predicted-peak formula and the report (rendering; keeping and writing ``memory.json``) are in
``_memory_report.py`` beside this file; this one measures.

1. ``predicted`` (always; meta device, no compute): saved-activation MiB per image, the largest
   segment's recompute peak, step FLOPs and a predicted training peak for ResNet-18/50/152
   (224 px) and CIFAR ResNet-18 (32 px), fp32 and bf16 x checkpointing none/block/stage/sqrt.
2. ``cpu`` (``--device cpu``): step time per image of CIFAR ResNet-18, batch 32, on this CPU.
3. ``cuda`` (``--device cuda``): ResNet-50/224, batch 64: ``torch.cuda.max_memory_allocated``
   and step time; the largest batch that trains in ``--limit-gib`` for fp32 vs ``--low-memory``.

A section not run this time is kept from ``memory.json`` already in ``--out`` (each section
records its own date and machine), so a GPU run adds its figures next to the CPU ones.
Every step is a real training step: SGD with momentum, forward under autocast (bf16 rows),
cross-entropy in fp32, backward, optimizer step. Timings are medians of steps after warm-up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    import resnet_scale  # noqa: F401
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))
from resnet_scale.memory import (  # noqa: E402
    apply_activation_checkpointing,
    apply_channels_last,
    count_step_flops,
    measure_saved_activation_bytes,
    measure_segment_peak_bytes,
)
from resnet_scale.models import build_resnet, count_parameters  # noqa: E402

try:
    import _memory_report  # noqa: F401
except ImportError:  # imported by path (tests/test_benchmarks_memory.py), not run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory_report import (  # noqa: E402
    BASELINE,
    FAST,
    LOW_MEMORY,
    GiB,
    MiB,
    Setting,
    kept_sections,
    machine,
    max_batch_for,
    predict_peak_bytes,
    ratio,
    render,  # noqa: F401 -- the tests render through this module
    write_report,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
POLICIES = ("none", "block", "stage", "sqrt")
OutOfMemoryError = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


@dataclass(frozen=True)
class Spec:
    """A model and the image size / batch it is benchmarked at."""

    name: str
    block: str
    depth: int
    stem: str
    image_size: int
    num_classes: int
    batch: int  # batch of the predicted peak (section 1) or of the timed steps (2, 3)

    def build(self) -> torch.nn.Module:
        return build_resnet(self.block, self.depth, stem=self.stem, num_classes=self.num_classes)


FULL = {
    "models": [
        Spec("ResNet-18", "basic", 18, "imagenet", 224, 1000, 64),
        Spec("ResNet-50", "bottleneck", 50, "imagenet", 224, 1000, 64),
        Spec("ResNet-152", "bottleneck", 152, "imagenet", 224, 1000, 64),
        Spec("CIFAR ResNet-18", "basic", 18, "cifar", 32, 10, 256),
    ],
    "cpu": Spec("CIFAR ResNet-18", "basic", 18, "cifar", 32, 10, 32),
    "cuda": Spec("ResNet-50", "bottleneck", 50, "imagenet", 224, 1000, 64),
    "cpu_steps": (2, 5),  # (warm-up, timed) steps per setting
    "cuda_steps": (5, 20),
    "max_batch": 8192,
}
_TINY = Spec("CIFAR basic-8 (smoke)", "basic", 8, "cifar", 16, 10, 4)
SMOKE = {
    "models": [_TINY],
    "cpu": Spec(_TINY.name, "basic", 8, "cifar", 16, 10, 2),
    "cuda": Spec(_TINY.name, "basic", 8, "cifar", 16, 10, 4),
    "cpu_steps": (1, 1),
    "cuda_steps": (1, 2),
    "max_batch": 64,
}
CPU_SETTINGS = [Setting(p, c) for p in DTYPES for c in POLICIES] + [
    Setting("fp32", "none", True), FAST, LOW_MEMORY]
CUDA_SETTINGS = [Setting("fp32", c) for c in POLICIES] + [Setting("bf16", c, True) for c in POLICIES]

# ----------------------------------------------------------------------------- 1. predicted


def _slope(fn, model, size: int, **kw) -> float:
    """Bytes per image: the slope between batch 2 and 4 (drops BatchNorm's batch-free stats)."""
    return (fn(model, 4, size, **kw) - fn(model, 2, size, **kw)) / 2


def run_predicted(specs: list[Spec], limit: float) -> dict:
    rows, models = [], []
    for spec in specs:
        with torch.device("meta"):
            model = spec.build()
        params, size = count_parameters(model), spec.image_size
        flops = {}
        for policy in POLICIES:
            f = count_step_flops(model, 1, size, policy=policy)
            flops[policy] = f["forward"] + f["backward"]
        input_per_image = 3 * size * size * 4
        models.append({"model": spec.name, "block": spec.block, "depth": spec.depth,
                       "stem": spec.stem, "image_size": size, "num_classes": spec.num_classes,
                       "batch": spec.batch, "parameters": params,
                       "input_mib_per_image": input_per_image / MiB})
        for precision, dtype in DTYPES.items():
            for policy in POLICIES:
                kw = dict(dtype=dtype, policy=policy)
                saved = _slope(measure_saved_activation_bytes, model, size, **kw)
                peak = 0.0 if policy == "none" else _slope(measure_segment_peak_bytes, model, size, **kw)
                parts = predict_peak_bytes(params, precision, spec.batch, saved, peak, input_per_image)
                rows.append({"model": spec.name, "precision": precision, "policy": policy,
                             "saved_mib_per_image": saved / MiB, "recompute_mib_per_image": peak / MiB,
                             "step_gflop_per_image": flops[policy] / 1e9,
                             "flops_vs_none": flops[policy] / flops["none"], "batch": spec.batch,
                             "predicted_gib": {k: v / GiB for k, v in parts.items()},
                             "max_batch_in_limit": max_batch_for(limit, parts, spec.batch)})
        base = next(r for r in rows if r["model"] == spec.name and r["precision"] == "fp32"
                    and r["policy"] == "none")
        for r in rows:
            if r["model"] == spec.name:
                r["saved_vs_fp32_none"] = r["saved_mib_per_image"] / base["saved_mib_per_image"]
                r["peak_vs_fp32_none"] = r["predicted_gib"]["total"] / base["predicted_gib"]["total"]
        models[-1]["activation_share_fp32_none"] = (
            base["predicted_gib"]["activations"] / base["predicted_gib"]["total"])
    return {"limit_gib": limit / GiB, "models": models, "rows": rows}

# ----------------------------------------------------------------------------- steps, timing


class Ops:
    """What a device offers the measuring code. CPU: no peak memory (``None``), no sync."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # set_per_process_memory_fraction needs it
            self.device = torch.device("cuda", torch.cuda.current_device())

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


class Runner:
    """One model, optimizer and synthetic batch, ready to run training steps."""

    def __init__(self, spec: Spec, setting: Setting, batch: int, ops: Ops) -> None:
        torch.manual_seed(0)
        self.ops, self.dtype = ops, DTYPES[setting.precision]
        self.model = spec.build().to(ops.device).train()
        fmt = torch.contiguous_format
        if setting.channels_last:  # the trainer's order (resnet_scale/memory/settings.py)
            apply_channels_last(self.model)
            fmt = torch.channels_last
        apply_activation_checkpointing(self.model, setting.policy)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                                   nesterov=True, weight_decay=5e-4)
        size = spec.image_size
        self.x = torch.randn(batch, 3, size, size, device=ops.device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, spec.num_classes, (batch,), device=ops.device)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.ops.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            logits = self.model(self.x)
        loss = F.cross_entropy(logits.float(), self.y)
        loss.backward()
        self.opt.step()

    def timed_step(self) -> tuple[float, float]:
        """(wall s, process CPU s) of one step; the device is synchronised on both sides."""
        self.ops.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        self.step()
        self.ops.sync()
        return time.perf_counter() - wall, time.process_time() - cpu


def measure_grid(spec: Spec, settings: list[Setting], ops: Ops, warmup: int, steps: int,
                 interleave: bool) -> list[dict]:
    """Median step time per image (and peak memory where the device has it) per setting.

    ``interleave``: build every setting, warm each up, then time one step of each in turn for
    ``steps`` rounds -- a shared CPU's load drifts, and this spreads the drift over all settings
    alike. Peak memory needs one setting alive at a time (``interleave=False``): build, warm up,
    reset the peak counter, time, read the peak, free.
    """
    times: dict[Setting, list[tuple[float, float]]] = {s: [] for s in settings}
    peaks: dict[Setting, int | None] = {s: None for s in settings}
    if interleave:
        runners = {s: Runner(spec, s, spec.batch, ops) for s in settings}
        for s in settings:
            for _ in range(warmup):
                runners[s].step()
        for _ in range(steps):
            for s in settings:
                times[s].append(runners[s].timed_step())
        del runners
    else:
        for s in settings:
            try:
                times[s], peaks[s] = _measure_alone(spec, s, ops, warmup, steps)
            except Exception as err:  # noqa: BLE001 -- out of memory is a result (a small GPU)
                if not is_oom(err):
                    raise
            ops.free()
    rows, b = [], spec.batch
    for s in settings:
        wall, cpu, peak = [w for w, _ in times[s]], [c for _, c in times[s]], peaks[s]
        ms = (lambda v: 1e3 * v / b) if wall else (lambda v: None)  # noqa: E731
        rows.append({"precision": s.precision, "policy": s.policy, "channels_last": s.channels_last,
                     "label": s.label, "batch": b, "out_of_memory": not wall,
                     "ms_per_image": ms(wall and statistics.median(wall)),
                     "min_ms_per_image": ms(wall and min(wall)),
                     "cpu_ms_per_image": ms(cpu and statistics.median(cpu)),
                     "peak_gib": None if peak is None else peak / GiB,
                     "peak_mib_per_image": None if peak is None else peak / MiB / b})
    return rows


def _measure_alone(spec: Spec, s: Setting, ops: Ops, warmup: int, steps: int):
    """(step times, peak bytes) of one setting with nothing else alive on the device."""
    runner = Runner(spec, s, spec.batch, ops)
    for _ in range(warmup):
        runner.step()
    ops.sync()
    ops.reset_peak()
    times = [runner.timed_step() for _ in range(steps)]
    return times, ops.peak()


# ----------------------------------------------------------------------------- batch search


def largest_batch(fits: Callable[[int], bool], *, start: int = 64, max_batch: int = 8192) -> int:
    """Largest batch in [1, max_batch] for which ``fits(batch)`` holds, 0 if none does.

    Assumes ``fits`` is monotone (fits at b => fits below b). Doubles from ``start`` until a
    batch fails (or max_batch fits), then bisects: about 2 log2(answer / start) + 1 calls.
    """
    lo, hi, b = 0, None, max(1, min(start, max_batch))  # fits(lo) known true; fits(hi) false
    while hi is None:
        if fits(b):
            lo = b
            if b == max_batch:
                return b
            b = min(2 * b, max_batch)
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def is_oom(err: BaseException) -> bool:
    """CUDA's allocator raises OutOfMemoryError; cuDNN/cuBLAS report failed allocations as
    RuntimeErrors ("CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")."""
    text = str(err)
    return isinstance(err, OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text))


def make_fits(attempt: Callable[[int], None], ops: Ops, trials: list) -> Callable[[int], bool]:
    """``fits(batch)``: True if ``attempt(batch)`` runs, False if it runs out of memory; frees
    the device cache after each try (the failed try's tensors die with its traceback)."""

    def fits(batch: int) -> bool:
        try:
            attempt(batch)
            ok = True
        except Exception as err:  # noqa: BLE001 -- only out-of-memory is an answer
            if not is_oom(err):
                raise
            ok = False
        ops.free()
        trials.append({"batch": batch, "fits": ok})
        return ok

    return fits


def train_attempt(spec: Spec, setting: Setting, ops: Ops, steps: int = 2) -> Callable[[int], None]:
    """Two steps: the second holds the momentum buffers the first created."""

    def attempt(batch: int) -> None:
        runner = Runner(spec, setting, batch, ops)
        for _ in range(steps):
            runner.step()
        ops.sync()

    return attempt


def run_cuda(spec: Spec, limit: float, warmup: int, steps: int, max_batch: int) -> dict:
    ops = Ops("cuda")
    torch.backends.cudnn.benchmark = True  # as the trainer: fixed shapes, fastest kernels
    grid = measure_grid(spec, CUDA_SETTINGS, ops, warmup, steps, interleave=False)
    total = torch.cuda.get_device_properties(ops.device).total_memory
    if limit > total:
        raise ValueError(f"--limit-gib {limit / GiB:g} exceeds the GPU's {total / GiB:.1f} GiB")
    out = {"model": spec.name, "batch": spec.batch, "image_size": spec.image_size,
           "warmup_steps": warmup, "timed_steps": steps, "cudnn_benchmark": True,
           "limit_gib": limit / GiB, "gpu_total_gib": total / GiB, "max_batch": max_batch,
           "rows": grid, "search": {}, "batch_ratio": None, "time_ratio_vs_fast": None,
           "goal_met": None}
    torch.cuda.set_per_process_memory_fraction(limit / total, ops.device)
    try:  # a failed search keeps the grid above
        for s in (BASELINE, LOW_MEMORY):
            trials: list = []
            started = time.perf_counter()
            best = largest_batch(make_fits(train_attempt(spec, s, ops), ops, trials),
                                 max_batch=max_batch)
            out["search"][s.label] = {"largest_batch": best, "trials": trials,
                                      "seconds": time.perf_counter() - started}
    except Exception:  # noqa: BLE001
        out["search_error"] = traceback.format_exc()
        print(out["search_error"], file=sys.stderr)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, ops.device)
        ops.free()
    by, found = {r["label"]: r for r in grid}, out["search"]
    if len(found) == 2:
        out["batch_ratio"] = ratio(found[LOW_MEMORY.label]["largest_batch"],
                                   found[BASELINE.label]["largest_batch"])
    out["time_ratio_vs_fast"] = ratio(by[LOW_MEMORY.label]["ms_per_image"],
                                      by[FAST.label]["ms_per_image"])
    if out["batch_ratio"] is not None and out["time_ratio_vs_fast"] is not None:
        out["goal_met"] = out["batch_ratio"] >= 4 and out["time_ratio_vs_fast"] <= 1.35
    return out


def run_cpu(spec: Spec, warmup: int, steps: int) -> dict:
    load = os.getloadavg()
    started = time.perf_counter()
    rows = measure_grid(spec, CPU_SETTINGS, Ops("cpu"), warmup, steps, interleave=True)
    base = next(r for r in rows if r["label"] == BASELINE.label)
    for r in rows:
        r["vs_fp32_none"] = ratio(r["ms_per_image"], base["ms_per_image"])
    return {"model": spec.name, "batch": spec.batch, "image_size": spec.image_size,
            "warmup_steps": warmup, "timed_steps": steps, "threads": torch.get_num_threads(),
            "load_before": load, "load_after": os.getloadavg(),
            "seconds": time.perf_counter() - started, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks",
                    help="folder for memory.md and memory.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one timed step (CI)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the timed steps run (section 2 on cpu, section 3 on cuda)")
    ap.add_argument("--limit-gib", type=float, default=8.0,
                    help="memory budget of the batch search and of 'max batch' (GiB)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the CPU section (default 1: on a shared machine "
                    "several threads spin-wait on each other and times swing 10-100x)")
    args = ap.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False on this machine")
    limit = args.limit_gib * GiB
    report = {"benchmark": "memory", "smoke": args.smoke, "sections": {},
              "command": " ".join(["python benchmarks/memory.py", *sys.argv[1:]] if argv is None
                                  else ["python benchmarks/memory.py", *argv])}
    # keep the other device's section (see module docstring)
    report["sections"].update(kept_sections(args.out, args.smoke))
    jobs = {"predicted": lambda: run_predicted(cfg["models"], limit)}
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        jobs["cpu"] = lambda: run_cpu(cfg["cpu"], *cfg["cpu_steps"])
    else:
        jobs["cuda"] = lambda: run_cuda(cfg["cuda"], limit, *cfg["cuda_steps"], cfg["max_batch"])
    failed = False
    for name, job in jobs.items():
        started = time.perf_counter()
        print(f"[memory] section {name} ...", flush=True)
        try:
            sec = job()
        except Exception:  # noqa: BLE001 -- report it, run the other sections
            sec, failed = {"error": traceback.format_exc()}, True
            print(sec["error"], file=sys.stderr)
        sec.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   machine=machine(args.device), wall_s=time.perf_counter() - started,
                   settings={"smoke": args.smoke, "device": args.device,
                             "limit_gib": args.limit_gib})
        report["sections"][name] = sec
        print(f"[memory] section {name}: {sec['wall_s']:.1f} s", flush=True)
    text = write_report(args.out, report)
    print(text)
    print(f"[memory] wrote {args.out / 'memory.md'} and memory.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
