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


def measure_model(spec: ModelSpec, limit: int, precisions=PRECISIONS, policies=POLICIES) -> list[dict]:
    """One row per precision x policy x compression: saved MiB per image (slope between batches 64
    and 128), the largest batch in ``limit`` and its ratio to fp32/none (which must be among them)."""
    ctx = context(spec)
    rows = []
    for precision in precisions:
        for policy in policies:
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


def _cell(r: dict) -> str:
    ratio = f"{r['batch_vs_fp32_none']:.2f}×" if r["batch_vs_fp32_none"] is not None else "–"
    return f"{r['saved_mib_per_image']:.2f} MiB · **{r['largest_batch']}** ({ratio})"


def render(report: dict) -> str:
    limit = report["limit_gib"]
    lines = [
        "# Activation compression: saved bytes and the largest batch",
        "",
        f"Generated by `{report['command']}` in {report['wall_s']:.0f} s on the CPU "
        f"({report['machine']}; {report['date']}). Nothing is computed: every figure comes from the "
        "planner's meta-device profile of the model.",
        "",
        "Each cell: **saved activations per image** (what the compressed model stores for backward: codes, "
        "per-group ranges, ReLU masks, narrowed max-pool indices and the tensors kept as they are; the "
        "exact figure `measure_saved_activation_bytes` reports, as the slope between batches 64 and 128) "
        f"· **the largest batch** whose predicted peak fits {limit:g} GiB on one GPU (one micro-batch; the "
        "planner's whole estimate `estimate_candidate`: fp32 weights, gradients, SGD momentum, bf16 weight "
        "casts, activations, the recompute peak of checkpointing, the restore peak of compression, the "
        "fp32 input batch and the workspace allowance max(256 MiB, 10 %); the dataset streamed) "
        "(its ratio to fp32 with no checkpointing and no compression). bf16 rows are channels_last, as "
        "the planner picks on a GPU.",
        "",
    ]
    for model in report["models"]:
        rows = model["rows"]
        lines += [f"## {model['name']}", "", "| precision | checkpointing | " + " | ".join(COMPRESSIONS) + " |",
                  "|---|---|" + "---|" * len(COMPRESSIONS)]
        cell = {(r["precision"], r["policy"], r["compression"]): r for r in rows}
        for precision in PRECISIONS:
            for policy in POLICIES:
                if (precision, policy, "none") in cell:
                    cells = [_cell(cell[precision, policy, c]) for c in COMPRESSIONS]
                    lines.append(f"| {precision} | {policy} | " + " | ".join(cells) + " |")
        lines.append("")
    v = report.get("verdict")
    if v:
        best, mild = v["best"], v["mildest_meeting_goal"]
        lines += ["## The goal: ResNet-50 at 224 px, 8× the fp32 batch", ""]
        if v["met"]:
            lines.append(
                f"**Met.** The largest batch is {best['largest_batch']} ({best['batch_vs_fp32_none']:.2f}× fp32/none) "
                f"with {best['precision']}, checkpointing {best['policy']}, {best['compression']}; the mildest "
                f"setting that reaches 8× is {mild['precision']}, checkpointing {mild['policy']}, "
                f"{mild['compression']} ({mild['largest_batch']}, {mild['batch_vs_fp32_none']:.2f}×).")
        else:
            lines.append(
                f"**Not met.** The best is {best['largest_batch']} ({best['batch_vs_fp32_none']:.2f}× fp32/none) with "
                f"{best['precision']}, checkpointing {best['policy']}, {best['compression']}.")
        lines += ["", v["why"], ""]
    return "\n".join(lines) + "\n"


def why(rows: list[dict], spec: ModelSpec, limit: int) -> str:
    """What the best ResNet-50 setting's peak is made of at its largest batch."""
    ctx = context(spec)
    best = max(rows, key=lambda r: r["largest_batch"])
    est = estimate(ctx, best["precision"], best["policy"], best["compression"], best["largest_batch"])
    parts = ", ".join(f"{k.replace('_', ' ')} {v / GiB:.2f}" for k, v in est.breakdown().items() if v)
    return (f"Its predicted peak at batch {best['largest_batch']}: {est.total / GiB:.2f} GiB = {parts} (GiB). "
            "For this model checkpointing does not help once activations are compressed: what a "
            "checkpointed segment recomputes is saved uncompressed, and that recompute peak outweighs the "
            "compressed segment inputs it spares (for ResNet-152, with many more blocks, block "
            "checkpointing + int2 is the best setting).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit-gib", type=float, default=8.0, help="memory budget per GPU (default 8)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks", help="output folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    limit = int(args.limit_gib * GiB)
    models = []
    for spec in MODELS:
        t = time.perf_counter()
        models.append({"name": spec.name, "spec": spec.__dict__, "rows": measure_model(spec, limit),
                       "seconds": time.perf_counter() - t})
        print(f"{spec.name}: {models[-1]['seconds']:.1f} s", flush=True)
    r50 = next(m for m in models if m["spec"]["depth"] == 50)
    verdict_ = verdict(r50["rows"])
    verdict_["why"] = why(r50["rows"], MODELS[1], limit)
    import torch

    report = {
        "command": "python benchmarks/compression_memory.py" + (f" --limit-gib {args.limit_gib:g}"
                                                               if args.limit_gib != 8.0 else ""),
        "limit_gib": args.limit_gib, "models": models, "verdict": verdict_,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "wall_s": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compression_memory.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "compression_memory.md").write_text(render(report))
    print(f"wrote {args.out / 'compression_memory.md'} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
