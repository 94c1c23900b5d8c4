"""Sections 3, 4 and 5 of ``benchmarks/gpu_suite.py``: memory (reusing benchmarks/memory.py's
measuring code), one-GPU DDP vs DeepSpeed ZeRO-2/3 (like for like: the same weights' memory
format, the same input tensors), and the planner's predicted peak against the peaks measured in
3 and 4. Each fills the section dict it is given as rows are measured."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

from _gpu_suite_report import MISS, Goal, add_flops
from _gpu_suite_speed import build_engine, device_peak, make_cfg, model_flags
from _gpu_suite_timing import flops_per_image, precision_label, tensor_format, time_windows, weights_format

HERE = Path(__file__).resolve().parent
DEEPSPEED_HINT = (
    "install DeepSpeed and what it imports: pip install -e \".[deepspeed]\" (offline, from a folder of "
    "wheels: pip install --no-index --find-links DIR deepspeed transformers einops msgpack), and run "
    "the suite again.")


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
            "--activation-checkpointing", policy]

# ----------------------------------------------------------------------------- 3. memory


def run_memory(cfg: dict, ops, goals: list[Goal], profile, sec: dict) -> dict:
    bm = _memory_module()
    s, b = cfg["mem"], cfg["mem"]["batch"]
    spec = _spec(bm, s, b)
    warmup, steps = cfg["mem_steps"]
    sec.update(title=f"Memory: {s['name']}, {s['size']} px, batch {b}", rows=[], tables={},
               columns=["label", "compute", "batch", "ms_per_image", "min_ms_per_image", "img_per_s", "tflops", "mfu",
                        "peak_gib", "peak_mib_per_image", "out_of_memory"],
               notes=[f"timed {steps} steps (each synchronised; median and fastest) after {warmup} warm-up, one "
                      "setting alive at a time (benchmarks/memory.py measure_grid); SGD momentum, cross-entropy fp32"])
    settings = [bm.BASELINE] + [bm.Setting("bf16", p, True) for p in ("none", "stage", "block", "sqrt")]
    rows = bm.measure_grid(spec, settings, ops, warmup, steps, interleave=False)
    fpi, peak = flops_per_image(s), device_peak(ops)
    for r in rows:
        r["flags"] = " ".join(model_flags(s, b) + _setting_flags(r["precision"], r["policy"], r["channels_last"]))
        r["compute"] = precision_label(r["precision"], ops.device.type)  # "fp32 (TF32 convs)" on a GPU
        r["img_per_s"] = 1e3 / r["ms_per_image"] if r.get("ms_per_image") else None
        add_flops(r, fpi, peak)
    sec["rows"] = rows
    by = {r["label"]: r for r in rows}
    time_ratio = bm.ratio(by[bm.LOW_MEMORY.label]["ms_per_image"], by[bm.FAST.label]["ms_per_image"])
    search = {}
    if ops.cuda:
        sec["tables"][f"Largest batch in {cfg['limit_gib']:g} GiB (set_per_process_memory_fraction)"] = {
            "columns": ["label", "largest_batch", "tries", "seconds", "error"],
            "rows": search_rows(bm, spec, cfg, ops, search)}
    else:
        sec["notes"].append(f"largest batch in {cfg['limit_gib']:g} GiB and max_memory_allocated: n/a on CPU")
    found = {k: v.get("largest_batch") for k, v in search.items()}
    batch_ratio = bm.ratio(found.get(bm.LOW_MEMORY.label), found.get(bm.BASELINE.label))
    failed = [v["label"] for v in search.values() if v.get("error")]
    new = [Goal("3", f"--low-memory largest batch in {cfg['limit_gib']:g} GiB vs fp32", batch_ratio, ">=", 4, "x",
                "n/a on CPU" if not ops.cuda else f"batch search failed: {', '.join(failed)}" if failed else ""),
           Goal("3", "--low-memory time/image vs bf16+CL", time_ratio, "<=", 1.35, "x")]
    goals += new
    sec.update(batch_ratio=batch_ratio, time_ratio_vs_fast=time_ratio)
    if any(g.status == MISS for g in new):
        runner = bm.Runner(spec, bm.LOW_MEMORY, b, ops)
        try:
            profile(new, runner.step, f"{bm.LOW_MEMORY.label} step, batch {b}")
        finally:
            del runner
            ops.free()
    return sec


def search_rows(bm, spec, cfg: dict, ops, search: dict) -> list[dict]:
    """The largest batch that trains under the memory limit (on a GPU), per setting. An error
    other than out-of-memory ends that setting's search and is recorded (the row's ``error``)."""
    if ops.cuda:
        total = torch.cuda.get_device_properties(ops.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg["limit_gib"] * 2**30 / total), ops.device)
    try:
        for st in (bm.BASELINE, bm.LOW_MEMORY):
            trials, started = [], time.perf_counter()
            try:
                best = bm.largest_batch(bm.make_fits(bm.train_attempt(spec, st, ops), ops, trials),
                                        max_batch=cfg["max_batch"])
                search[st.label] = {"label": st.label, "largest_batch": best}
            except Exception as err:  # noqa: BLE001 -- recorded: the other setting and sections still run
                print(traceback.format_exc(), file=sys.stderr)
                search[st.label] = {"label": st.label, "largest_batch": None,
                                    "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            finally:
                ops.free()
            search[st.label].update(tries=len(trials), seconds=time.perf_counter() - started, trials=trials)
    finally:
        if ops.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, ops.device)
        ops.free()
    return list(search.values())

# ----------------------------------------------------------------------------- 4. DDP vs ZeRO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_deepspeed() -> str | None:
    """None when ``import deepspeed`` works, else the ImportError's own text (DeepSpeed imports
    einops, msgpack and others at the top level: the missing one is named there)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def _zero_row(label, flags, s, x, y, timing, ops, fpi, peak, goals, profile, ddp: dict | None) -> dict:
    """One engine's step timed in windows; its weights stay NCHW whatever the engine (like for like)."""
    warmup, windows, per_window = timing
    eng = build_engine(flags, ops.device.type, s["classes"], weights_channels_last=False)
    try:
        fn = lambda: eng.step(x, y)  # noqa: E731
        fig = time_windows(fn, warmup=warmup, windows=windows, per_window=per_window, ops=ops, batch=len(y))
        row = add_flops({"config": label, "flags": " ".join(eng.flags), **fig, "wrapper": type(eng.model).__name__,
                         "weights_format": weights_format(eng.model), "input_format": tensor_format(x)}, fpi, peak)
        row["vs_ddp"] = row["ms_per_step"] / (ddp or row)["ms_per_step"]
        if ddp is not None:
            z = int(flags[flags.index("--zero-stage") + 1])
            new = [Goal("4", f"ZeRO-{z} step time vs DDP", row["vs_ddp"], "<=", 1.10 if z == 2 else 1.30, "x")]
            goals += new
            profile(new, fn, label)
        return row
    finally:
        eng = fn = None
        ops.free()


def run_zero(cfg: dict, ops, goals: list[Goal], profile, sec: dict) -> dict:
    s, b = cfg["zero"], cfg["zero"]["batch"]
    sec.update(title=f"One device, {s['name']} {s['size']} px bf16, batch {b}: DDP vs ZeRO-2 vs ZeRO-3", rows=[],
               columns=["config", "batch", "windows", "ms_per_step", "img_per_s", "img_per_s_min", "img_per_s_max",
                        "vs_ddp", "tflops", "mfu", "weights_format", "input_format", "peak_gib"],
               notes=["like for like: every row trains on the same input tensors (NHWC, bf16 autocast) with its "
                      "weights in the same memory format (NCHW: ZeRO's flat buffers keep them so, and the DDP row "
                      "does the same here); `weights_format` and `input_format` are read from the tensors",
                      "DeepSpeed on one process: WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1, a free "
                      "MASTER_PORT; the DDP row runs the plain model (one process needs no DDP wrapper); the step "
                      "is resnet_scale's train_step"])
    if not ops.cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    failure = import_deepspeed()
    if failure:
        print(f"[gpu_suite] section 4 skipped: import deepspeed failed: {failure}\n{DEEPSPEED_HINT}", file=sys.stderr)
        goals += [Goal("4", f"ZeRO-{z} step time vs DDP", None, "<=", t, "x", "skipped: import deepspeed failed")
                  for z, t in ((2, 1.10), (3, 1.30))]
        sec.update(skipped=f"import deepspeed failed: {failure}", notes=sec["notes"] + [DEEPSPEED_HINT])
        return sec
    warmup, windows, per_window = cfg["zero_timing"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, s["size"], s["size"], generator=g).to(ops.device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, s["classes"], (b,), generator=g).to(ops.device)
    base = model_flags(s, b) + ["--precision", "bf16", "--channels-last"]
    rows, saved_env = sec["rows"], dict(os.environ)
    fpi, peak = flops_per_image(s), device_peak(ops)
    try:
        for label, extra in (("DDP (plain model, 1 process)", ["--distributed", "ddp"]),
                             ("ZeRO-2", ["--zero-stage", "2"]), ("ZeRO-3", ["--zero-stage", "3"])):
            if extra[0] == "--zero-stage" and "MASTER_PORT" not in os.environ:
                os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(_free_port()))
            row = _zero_row(label, base + extra, s, x, y, (warmup, windows, per_window), ops, fpi, peak, goals, profile,
                            rows[0] if rows else None)
            rows.append(row)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return sec

# ----------------------------------------------------------------------------- 5. planner


def run_planner(cfg: dict, sections: dict, goals: list[Goal], device: str, sec: dict) -> dict:
    from resnet_scale.planner import estimate_memory

    sec.update(title="Planner: predicted vs measured peak (max_memory_allocated)", rows=[],
               columns=["section", "config", "predicted_gib", "measured_gib", "error"],
               notes=["predicted = estimate_memory(cfg, world_size=1, device_type='cuda').total minus its dataset "
                      "line; measured = max_memory_allocated over the timed steps of sections 3 and 4"])
    rows = sec["rows"]
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
    return sec
