"""Sections 3, 4 and 5 of ``benchmarks/gpu_suite.py``: memory (reusing benchmarks/memory.py's
measuring code), one-GPU DDP vs DeepSpeed ZeRO-2/3, and the planner's predicted peak against
the peaks measured in 3 and 4."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
from pathlib import Path

import torch

from _gpu_suite_report import Goal
from _gpu_suite_speed import build_engine, make_cfg, model_flags, time_steps

HERE = Path(__file__).resolve().parent
DEEPSPEED_HINT = (
    "deepspeed is not installed: pip install -e \".[deepspeed]\" (offline, from a folder of wheels: "
    "pip install --no-index --find-links DIR deepspeed transformers), and run the suite again.")


def _memory_module():
    """benchmarks/memory.py, imported by path (its Runner, measure_grid and batch search)."""
    if "benchmarks_memory" in sys.modules:
        return sys.modules["benchmarks_memory"]
    spec = importlib.util.spec_from_file_location("benchmarks_memory", HERE / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _spec(bm, s: dict, batch: int):
    return bm.Spec(s["name"], s["block"], s["depth"], s["stem"], s["size"], s["classes"], batch)


def _setting_flags(precision: str, policy: str, channels_last: bool) -> list[str]:
    return ["--precision", precision, "--channels-last" if channels_last else "--no-channels-last",
            "--checkpointing", policy]

# ----------------------------------------------------------------------------- 3. memory


def run_memory(cfg: dict, ops, goals: list[Goal], profile) -> dict:
    bm = _memory_module()
    s, b = cfg["mem"], cfg["mem"]["batch"]
    spec = _spec(bm, s, b)
    warmup, steps = cfg["mem_steps"]
    settings = [bm.BASELINE] + [bm.Setting("bf16", p, True) for p in ("none", "stage", "block", "sqrt")]
    rows = bm.measure_grid(spec, settings, ops, warmup, steps, interleave=False)
    for r in rows:
        r["flags"] = " ".join(model_flags(s, b) + _setting_flags(r["precision"], r["policy"], r["channels_last"]))
    by = {r["label"]: r for r in rows}
    time_ratio = bm.ratio(by[bm.LOW_MEMORY.label]["ms_per_image"], by[bm.FAST.label]["ms_per_image"])
    limit = cfg["limit_gib"] * 2**30
    search, notes = {}, []
    if ops.cuda:
        total = torch.cuda.get_device_properties(ops.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), ops.device)
        try:
            for st in (bm.BASELINE, bm.LOW_MEMORY):
                trials, started = [], time.perf_counter()
                best = bm.largest_batch(bm.make_fits(bm.train_attempt(spec, st, ops), ops, trials),
                                        max_batch=cfg["max_batch"])
                search[st.label] = {"label": st.label, "largest_batch": best, "tries": len(trials),
                                    "seconds": time.perf_counter() - started}
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, ops.device)
            ops.free()
    else:
        notes.append(f"largest batch in {cfg['limit_gib']:g} GiB and max_memory_allocated: n/a on CPU")
    batch_ratio = bm.ratio(search.get(bm.LOW_MEMORY.label, {}).get("largest_batch"),
                           search.get(bm.BASELINE.label, {}).get("largest_batch"))
    new = [Goal("3", f"--low-memory largest batch in {cfg['limit_gib']:g} GiB vs fp32", batch_ratio, ">=", 4, "x",
                "" if ops.cuda else "n/a on CPU"),
           Goal("3", "--low-memory time/image vs bf16+CL", time_ratio, "<=", 1.35, "x")]
    goals += new
    if any(g.status == "MISS" for g in new):
        runner = bm.Runner(spec, bm.LOW_MEMORY, b, ops)
        profile(new, runner.step, f"{bm.LOW_MEMORY.label} step, batch {b}")
        del runner
        ops.free()
    return {"title": f"Memory: {s['name']}, {s['size']} px, batch {b}",
            "columns": ["label", "batch", "ms_per_image", "peak_gib", "peak_mib_per_image", "out_of_memory"],
            "rows": rows, "tables": {f"Largest batch in {cfg['limit_gib']:g} GiB (set_per_process_memory_fraction)": {
                "columns": ["label", "largest_batch", "tries", "seconds"], "rows": list(search.values())}}
                if search else {},
            "batch_ratio": batch_ratio, "time_ratio_vs_fast": time_ratio,
            "notes": notes + [f"timed {steps} steps after {warmup} warm-up, one setting alive at a time "
                              "(benchmarks/memory.py measure_grid); SGD momentum, cross-entropy fp32"]}

# ----------------------------------------------------------------------------- 4. DDP vs ZeRO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_zero(cfg: dict, ops, goals: list[Goal], profile) -> dict:
    s, b = cfg["zero"], cfg["zero"]["batch"]
    title = f"One device, {s['name']} {s['size']} px bf16, batch {b}: DDP vs ZeRO-2 vs ZeRO-3"
    if cfg.get("skip_deepspeed"):
        goals += [Goal("4", f"ZeRO-{z} step time vs DDP", None, "<=", t, "x", "skipped in smoke")
                  for z, t in ((2, 1.10), (3, 1.30))]
        return {"title": title, "skipped": cfg["skip_deepspeed"], "rows": []}
    if not ops.cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print(DEEPSPEED_HINT, file=sys.stderr)
        goals += [Goal("4", f"ZeRO-{z} step time vs DDP", None, "<=", t, "x", "deepspeed not installed")
                  for z, t in ((2, 1.10), (3, 1.30))]
        return {"title": title, "skipped": "deepspeed not installed", "notes": [DEEPSPEED_HINT], "rows": []}
    warmup, steps = cfg["zero_steps"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, s["size"], s["size"], generator=g).to(ops.device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, s["classes"], (b,), generator=g).to(ops.device)
    base = model_flags(s, b) + ["--precision", "bf16", "--channels-last"]
    rows, saved_env = [], dict(os.environ)
    try:
        for label, extra in (("DDP (plain model, 1 process)", ["--distributed", "ddp"]),
                             ("ZeRO-2", ["--zero-stage", "2"]), ("ZeRO-3", ["--zero-stage", "3"])):
            if extra[0] == "--zero-stage" and "MASTER_PORT" not in os.environ:
                os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(_free_port()))
            eng = build_engine(base + extra, ops.device.type, s["classes"])
            fn = lambda: eng.step(x, y)  # noqa: E731
            rows.append({"config": label, "flags": " ".join(eng.flags), **time_steps(fn, warmup, steps, ops, b)})
            rows[-1]["vs_ddp"] = rows[-1]["ms_per_step"] / rows[0]["ms_per_step"]
            if label != rows[0]["config"]:
                z = int(extra[1])
                new = [Goal("4", f"ZeRO-{z} step time vs DDP", rows[-1]["vs_ddp"], "<=", 1.10 if z == 2 else 1.30, "x")]
                goals += new
                profile(new, fn, label)
            del eng, fn
            ops.free()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return {"title": title, "rows": rows,
            "columns": ["config", "batch", "warmup_steps", "timed_steps", "ms_per_step", "img_per_s", "vs_ddp",
                        "peak_gib"],
            "notes": ["DeepSpeed on one process: WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1, a free "
                      "MASTER_PORT; under ZeRO the weights stay NCHW and the NHWC inputs carry channels_last"]}

# ----------------------------------------------------------------------------- 5. planner


def run_planner(cfg: dict, sections: dict, goals: list[Goal], device: str) -> dict:
    from resnet_scale.planner import estimate_memory

    rows = []
    for key in ("3", "4"):
        for r in sections.get(key, {}).get("rows", []):
            if not r.get("flags"):
                continue
            c = make_cfg(r["flags"].split() + ["--data", "synthetic"])
            est = estimate_memory(c, world_size=1, device_type="cuda")
            # The benchmark holds no data set on the device (one batch of tensors), so the
            # planner's "dataset" line is left out of the comparison.
            predicted = est.total - est.dataset
            measured = None if r.get("peak_gib") is None else r["peak_gib"] * 2**30
            err = None if not measured else predicted / measured - 1
            label = r.get("label") or r.get("config")
            rows.append({"section": key, "config": label, "predicted_gib": predicted / 2**30,
                         "measured_gib": None if measured is None else measured / 2**30, "error": err,
                         "excluded_dataset_gib": est.dataset / 2**30})
            goals.append(Goal("5", f"planner peak, ({key}) {label}", err, "within", 0.15, "",
                              "" if measured else f"measured n/a on {device.upper()}"))
    return {"title": "Planner: predicted vs measured peak (max_memory_allocated)", "rows": rows,
            "columns": ["section", "config", "predicted_gib", "measured_gib", "error"],
            "notes": ["predicted = estimate_memory(cfg, world_size=1, device_type='cuda').total minus its dataset "
                      "line; measured = max_memory_allocated over the timed steps of sections 3 and 4"]}
