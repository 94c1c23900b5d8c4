"""Activation compression x checkpointing x precision: saved activation bytes per image (the exact
meta-device meter's figure, as the planner derives it) and the largest batch the planner predicts
fits in a memory budget (its whole estimate: weights, gradients, optimizer states, weight casts,
activations, recompute and restore peaks, the input batch, workspace), beside fp32 with nothing.

    python benchmarks/compression_memory.py [--limit-gib 8] [--out docs/benchmarks]

Runs on the CPU in a few minutes (meta device: nothing is computed). Writes
``compression_memory.md`` and ``compression_memory.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB, MiB = 2**30, 2**20
COMPRESSIONS = ("none", "int8", "int4", "int2")
POLICIES = ("none", "block", "stage", "sqrt")
PRECISIONS = ("fp32", "bf16")
GOAL = 8.0  # ResNet-50 at 224 px: this many times the fp32/none batch


@dataclass(frozen=True)
class ModelSpec:
    name: str
    block: str
    depth: int
    stem: str
    image_size: int
    classes: int


MODELS = (
    ModelSpec("ResNet-18, 224 px", "basic", 18, "imagenet", 224, 1000),
    ModelSpec("ResNet-50, 224 px", "bottleneck", 50, "imagenet", 224, 1000),
    ModelSpec("ResNet-152, 224 px", "bottleneck", 152, "imagenet", 224, 1000),
    ModelSpec("CIFAR ResNet-18, 32 px", "basic", 18, "cifar", 32, 10),
)
TINY = ModelSpec("tiny (basic 1,1,1), 8 px", "basic", 8, "cifar", 8, 10)


def context(spec: ModelSpec):
    """The planner's context for one model on one CUDA device, the dataset streamed (not on the device)."""
    from resnet_scale.config import Config
    from resnet_scale.planner.estimate import PlanContext

    cfg = Config()
    cfg.model.block, cfg.model.depth, cfg.model.stem = spec.block, spec.depth, spec.stem
    if spec is TINY:
        cfg.model.depth, cfg.model.layers = None, (1, 1, 1)
    cfg.data.source, cfg.data.image_size, cfg.data.synthetic_classes = "synthetic", spec.image_size, spec.classes
    cfg.train.batch_size = 2
    ctx = PlanContext.build(cfg.validate(), 1, "cuda")
    ctx.dataset, ctx.dataset_note = 0, "streamed"
    return ctx


def estimate(ctx, precision: str, policy: str, compression: str, batch: int):
    from resnet_scale.planner.estimate import Candidate, estimate_candidate

    cl = precision != "fp32"  # what the planner picks on a GPU
    return estimate_candidate(ctx, Candidate(precision, cl, policy, batch, batch, activation_compression=compression))


def largest_batch(ctx, precision: str, policy: str, compression: str, limit: int, cap: int = 1 << 16) -> int:
    """The largest batch (one micro-batch) whose predicted peak fits ``limit`` (0 if none)."""
    if estimate(ctx, precision, policy, compression, 2).total > limit:  # BatchNorm needs 2 at 1x1 maps
        return 0
    lo, hi = 2, 4
    while hi <= cap and estimate(ctx, precision, policy, compression, hi).total <= limit:
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate(ctx, precision, policy, compression, mid).total <= limit else (lo, mid)
    return lo


def measure_model(spec: ModelSpec, limit: int) -> list[dict]:
    """One row per precision x policy x compression: saved MiB per image (slope between batches 64
    and 128), the largest batch in ``limit`` and its ratio to fp32/none."""
    ctx = context(spec)
    rows = []
    for precision in PRECISIONS:
        for policy in POLICIES:
            for compression in COMPRESSIONS:
                a = estimate(ctx, precision, policy, compression, 64)
                b = estimate(ctx, precision, policy, compression, 128)
                rows.append({
                    "precision": precision, "policy": policy, "compression": compression,
                    "saved_mib_per_image": (b.activations - a.activations) / 64 / MiB,
                    "largest_batch": largest_batch(ctx, precision, policy, compression, limit),
                })
    base = next(r for r in rows if r["precision"] == "fp32" and r["policy"] == "none" and r["compression"] == "none")
    for r in rows:
        r["saved_vs_fp32_none"] = r["saved_mib_per_image"] / base["saved_mib_per_image"]
        r["batch_vs_fp32_none"] = r["largest_batch"] / base["largest_batch"] if base["largest_batch"] else None
    return rows


def verdict(rows: list[dict]) -> dict:
    """Does ResNet-50 at 224 px reach GOAL x the fp32/none batch, and with which setting."""
    best = max(rows, key=lambda r: (r["largest_batch"], -COMPRESSIONS.index(r["compression"])))
    met = [r for r in rows if (r["batch_vs_fp32_none"] or 0) >= GOAL]
    mildest = min(met, key=lambda r: (COMPRESSIONS.index(r["compression"]), -r["largest_batch"])) if met else None
    return {"goal": GOAL, "met": bool(met), "best": best, "mildest_meeting_goal": mildest}
