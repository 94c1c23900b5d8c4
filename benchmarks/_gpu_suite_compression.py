"""Section 6 of ``benchmarks/gpu_suite.py``: activation compression on the device. ResNet-50 at
224 px, bf16 + channels_last, with ``--activation-compression int8|int4|int2`` against the same
run without it: time per image (goal <= 1.5x) and peak memory (``max_memory_allocated``), beside
the saved-activation bytes per image the exact meter predicts for each (meta device)."""

from __future__ import annotations

import torch

from _gpu_suite_report import Goal, add_flops
from _gpu_suite_speed import build_engine, device_peak, model_flags
from _gpu_suite_timing import flops_per_image, tensor_format, time_windows
from resnet_scale.memory import applied_compression, apply_activation_compression, measure_saved_activation_bytes
from resnet_scale.models import build_resnet

#: time per image of a compressed step vs bf16 + channels_last without compression
TIME_GOAL = 1.5


def saved_mib_per_image(s: dict, mode: str) -> float:
    """The exact meter's saved-activation MiB per image (bf16 autocast, channels_last; the slope
    between batch 2 and 4), with ``mode`` applied to a meta-device model."""
    with torch.device("meta"):
        model = build_resnet(s["block"], s["depth"], stem=s["stem"], num_classes=s["classes"])
    apply_activation_compression(model, mode)
    at = [measure_saved_activation_bytes(model, b, s["size"], dtype=torch.bfloat16, channels_last=True)
          for b in (2, 4)]
    return (at[1] - at[0]) / 2 / 2**20


def run_compression(cfg: dict, ops, goals: list[Goal], profile, sec: dict) -> dict:
    s, b = cfg["comp"], cfg["comp"]["batch"]
    warmup, windows, per_window = cfg["comp_timing"]
    sec.update(title=f"Activation compression: {s['name']}, {s['size']} px, bf16 + channels_last, batch {b}",
               rows=[], columns=["config", "applied", "batch", "windows", "ms_per_image", "img_per_s", "img_per_s_min",
                                 "img_per_s_max", "vs_uncompressed", "tflops", "mfu", "peak_gib",
                                 "peak_vs_uncompressed", "saved_mib_per_image"],
               notes=["each row is resnet_scale's train_step (resolve_memory -> build_accelerator -> "
                      "apply_memory_transforms -> prepare) on one resident batch (NHWC, bf16 autocast), timed in "
                      f"windows of {per_window} steps after {warmup} warm-up steps; peak_gib = "
                      "max_memory_allocated over the timed windows",
                      "saved_mib_per_image: the exact meter's saved-activation bytes per image for the same "
                      "setting (meta device, no compute): the part of the peak compression shrinks; weights, "
                      "gradients, optimizer state and the batch are the rest",
                      f"goal: time per image <= {TIME_GOAL:g}x the uncompressed row (quantization is plain torch "
                      "ops, no fused kernel)"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, s["size"], s["size"], generator=gen).to(ops.device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, s["classes"], (b,), generator=gen).to(ops.device)
    base = model_flags(s, b) + ["--precision", "bf16", "--channels-last"]
    fpi, peak = flops_per_image(s), device_peak(ops)
    rows = sec["rows"]
    sec["notes"].append("applied: the compression mode found on the model that was timed (applied_compression)")
    for mode in cfg["comp_modes"]:  # "none" first: the reference
        flags = base + ["--activation-compression", mode]
        label = "bf16 + channels_last" + ("" if mode == "none" else f" + {mode}")
        eng = build_engine(flags, ops.device.type, s["classes"])
        try:
            fn = lambda: eng.step(x, y)  # noqa: E731
            fig = time_windows(fn, warmup=warmup, windows=windows, per_window=per_window, ops=ops, batch=b)
            applied = applied_compression(getattr(eng.model, "module", eng.model))
            row = add_flops({"config": label, "mode": mode, "flags": " ".join(eng.flags), **fig,
                             "applied": applied["mode"] if applied else "none",
                             "input_format": tensor_format(x), "saved_mib_per_image": saved_mib_per_image(s, mode)},
                            fpi, peak)
            ref = rows[0] if rows else row
            row["vs_uncompressed"] = row["ms_per_image"] / ref["ms_per_image"]
            row["peak_vs_uncompressed"] = (row["peak_gib"] / ref["peak_gib"] if row["peak_gib"] is not None
                                           and ref.get("peak_gib") else None)
            rows.append(row)
            if mode != "none":
                new = [Goal("6", f"{s['name']} bf16+CL+{mode} time/image vs bf16+CL", row["vs_uncompressed"],
                            "<=", TIME_GOAL, "x")]
                goals += new
                profile(new, fn, label)
        finally:
            eng = fn = None
            ops.free()
    return sec
