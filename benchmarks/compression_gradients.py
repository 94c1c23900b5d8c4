"""Gradient error of activation compression: how far each parameter's gradient moves when the
tensors saved for backward are stored as int8 / int4 / int2 (``--activation-compression``).

    python benchmarks/compression_gradients.py [--out docs/benchmarks] [--draws 8] [--smoke]

Writes ``compression_gradients.md``, ``.json`` and ``.csv`` (one row per parameter and setting)
to ``--out``. For each model (ResNet-18 and ResNet-50: ImageNet stem at 224 px, CIFAR stem at
32 px), each checkpointing policy (``none``, ``block``) and each mode, on one batch and one set
of weights:

* ``g``: the uncompressed gradient with the same checkpointing (so only compression differs);
* ``g_c``: ``--draws`` compressed gradients, each with its own stochastic rounding (seeded);
* per parameter, the relative error ``||g_c - g|| / ||g||``; summarised per draw as ``overall``
  (all parameters as one vector), median and max over parameters, and per stage (stem = conv1 +
  bn1, layer1..4, fc); the table gives the mean over draws and their standard deviation;
* ``mean_k``: the same error for the mean of the ``--draws`` compressed gradients. Stochastic
  rounding makes each restored activation unbiased, so if the gradient error is variance it
  shrinks as 1/sqrt(K) (``x sqrt(K)`` near 1); a bias would stay. ``bias`` and ``noise`` split
  the error: E||g_c - g||^2 = b^2 + v and E||mean_K - g||^2 = b^2 + v / K give both;
* for scale, ``sgd_noise``: ||g(B1) - g(B2)|| / ||g(B1)|| for two uncompressed batches of the
  same size -- the minibatch noise that compression's error adds to.

Inputs (``--data``): ``digits`` (default; scikit-learn's handwritten digits, real images with
labels a network can learn, normalised and resized bilinearly to the model's size) or ``noise``
(N(0, 1) images with random labels: no signal, so two batches' gradients are nearly orthogonal).
Weights as initialised (seed 0), training mode (BatchNorm uses batch statistics). One thread
unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    import resnet_scale  # noqa: F401
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))
from resnet_scale.memory import apply_activation_checkpointing, apply_activation_compression  # noqa: E402
from resnet_scale.models import build_resnet  # noqa: E402

MODES = ("int8", "int4", "int2")
POLICIES = ("none", "block")
DATA_TEXT = {"digits": "scikit-learn's handwritten digits (real images, learnable labels), normalised and "
                       "resized bilinearly to the model's size",
             "noise": "N(0, 1) images with random labels (no signal: two batches' gradients are nearly orthogonal)"}
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")


@dataclass(frozen=True)
class Spec:
    name: str
    block: str
    depth: int | None
    stem: str
    size: int
    classes: int
    batch: int
    layers: tuple[int, ...] | None = None

    def build(self) -> torch.nn.Module:
        return build_resnet(self.block, self.depth, stem=self.stem, num_classes=self.classes,
                            layers=self.layers)


FULL = [Spec("ResNet-18", "basic", 18, "imagenet", 224, 1000, 2),
        Spec("ResNet-50", "bottleneck", 50, "imagenet", 224, 1000, 2),
        Spec("ResNet-18", "basic", 18, "cifar", 32, 10, 4),
        Spec("ResNet-50", "bottleneck", 50, "cifar", 32, 10, 4)]
SMOKE = [Spec("basic 1,1,1 (smoke)", "basic", None, "cifar", 8, 10, 4, (1, 1, 1))]


def stage_of(name: str) -> str:
    head = name.split(".")[0]
    return head if head in STAGES else "stem"


@functools.lru_cache(maxsize=1)
def _digits():
    from resnet_scale.data import build_datasets  # scikit-learn's digits: imported only here

    train, _ = build_datasets("digits")
    return train


def two_batches(spec: Spec, data: str, gen: torch.Generator) -> list[torch.Tensor]:
    """[x1, y1, x2, y2]: two disjoint batches of ``spec.batch`` images at ``spec.size`` px."""
    b, shape = spec.batch, (spec.batch, 3, spec.size, spec.size)
    if data == "noise":
        x1, x2 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        return [x1, torch.randint(0, spec.classes, (b,), generator=gen),
                x2, torch.randint(0, spec.classes, (b,), generator=gen)]
    if data != "digits":
        raise ValueError(f"data {data!r}: choose digits or noise")
    train = _digits()
    idx = torch.randperm(len(train.labels), generator=gen)[:2 * b]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (train.mean, train.std))
    x = F.interpolate((train.images[idx].float() / 255 - mean) / std, size=(spec.size, spec.size),
                      mode="bilinear", align_corners=False)
    y = train.labels[idx] % spec.classes
    return [x[:b], y[:b], x[b:], y[b:]]


def gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Parameter gradients of one training step's loss (the rounding noise seeded by ``seed``)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _errors(g: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
            ref_sq: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(per-parameter relative error, summary: overall, median, max and one per stage)."""
    diff_sq = {n: float((g[n].double() - ref[n].double()).pow(2).sum()) for n in ref}
    per = {n: math.sqrt(diff_sq[n] / ref_sq[n]) if ref_sq[n] > 0 else 0.0 for n in ref}
    summary = {"overall": math.sqrt(sum(diff_sq.values()) / sum(ref_sq.values())),
               "median": statistics.median(per.values()), "max": max(per.values())}
    for stage in STAGES:
        names = [n for n in ref if stage_of(n) == stage]
        den = sum(ref_sq[n] for n in names)
        summary[stage] = math.sqrt(sum(diff_sq[n] for n in names) / den) if den > 0 else None
    return per, summary


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fresh(spec: Spec, state: dict, policy: str, mode: str) -> torch.nn.Module:
    model = spec.build().train()
    model.load_state_dict(state)
    apply_activation_checkpointing(model, policy)
    apply_activation_compression(model, mode)
    return model


def measure_model(spec: Spec, *, draws: int = 8, modes=MODES, policies=POLICIES, seed: int = 0,
                  data: str = "digits") -> dict:
    """The gradient errors of one model: ``rows`` (one per policy x mode, summaries over
    ``draws``), ``params`` (one per parameter x policy x mode), ``sgd_noise`` and the
    uncompressed checkpointed-vs-plain difference (``checkpoint_vs_plain``: ~1e-7 expected)."""
    torch.manual_seed(seed)
    base = spec.build().train()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    x1, y1, x2, y2 = two_batches(spec, data, torch.Generator().manual_seed(seed))
    refs, rows, params = {}, [], []
    for policy in policies:
        ref = refs[policy] = gradient(_fresh(spec, state, policy, "none"), x1, y1, seed)
        ref_sq = {n: float(t.double().pow(2).sum()) for n, t in ref.items()}
        for mode in modes:
            model = _fresh(spec, state, policy, mode)
            started = time.perf_counter()
            total = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in ref.items()}
            per_draw, summaries = [], []
            for k in range(draws):
                g = gradient(model, x1, y1, seed + 1 + k)
                for n in total:
                    total[n] += g[n]
                per, summary = _errors(g, ref, ref_sq)
                per_draw.append(per)
                summaries.append(summary)
            mean_per, mean_summary = _errors({n: t / draws for n, t in total.items()}, ref, ref_sq)
            row = {"model": spec.name, "size": spec.size, "stem": spec.stem, "batch": spec.batch,
                   "policy": policy, "mode": mode, "draws": draws,
                   "seconds_per_step": (time.perf_counter() - started) / draws}
            for key in ("overall", "median", "max", *STAGES):
                row[key], row[key + "_sd"] = _mean_sd([s[key] for s in summaries])
            e1_sq = statistics.fmean(s["overall"] ** 2 for s in summaries)
            ek_sq = mean_summary["overall"] ** 2
            row["mean_k"] = mean_summary["overall"]
            row["mean_k_median"] = mean_summary["median"]
            row["mean_k_x_sqrt_k"] = mean_summary["overall"] * math.sqrt(draws) / row["overall"]
            if draws > 1:  # b^2 + v = E e1^2, b^2 + v / K = e_K^2
                row["bias"] = math.sqrt(max(0.0, (draws * ek_sq - e1_sq) / (draws - 1)))
                row["noise"] = math.sqrt(max(0.0, (e1_sq - ek_sq) * draws / (draws - 1)))
            rows.append(row)
            for n in ref:
                errs = [d[n] for d in per_draw]
                m, sd = _mean_sd(errs)
                params.append({"model": spec.name, "size": spec.size, "policy": policy, "mode": mode,
                               "parameter": n, "stage": stage_of(n), "numel": ref[n].numel(),
                               "grad_norm": math.sqrt(ref_sq[n]), "rel_err": m, "rel_err_sd": sd,
                               "rel_err_mean_k": mean_per[n], "draws": draws})
    noise_ref = refs[policies[0]]
    g2 = gradient(_fresh(spec, state, policies[0], "none"), x2, y2, seed)
    _, noise = _errors(g2, noise_ref, {n: float(t.double().pow(2).sum()) for n, t in noise_ref.items()})
    ckpt = None
    if len(policies) > 1:
        plain_sq = {n: float(t.double().pow(2).sum()) for n, t in refs[policies[0]].items()}
        ckpt = {p: _errors(refs[p], refs[policies[0]], plain_sq)[1]["overall"] for p in policies[1:]}
    return {"model": spec.name, "spec": asdict(spec), "rows": rows, "params": params, "sgd_noise": noise,
            "checkpoint_vs_plain": ckpt}

# ----------------------------------------------------------------------------- report


def _pct(v: float | None, sd: float | None = None) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.2f} %" + (f" ± {100 * sd:.2f}" if sd is not None else "")


def render(report: dict) -> str:
    s = report["settings"]
    out = ["# Activation compression: gradient error", "",
           f"Measured {report['date']} on {report['machine']['cpu']} ({report['machine']['threads']} torch "
           f"thread(s)), torch {report['machine']['torch']}, Python {report['machine']['python']}; "
           f"wall time {report['wall_s']:.0f} s, of which this process had the CPU for {report['cpu_s']:.0f} s "
           f"(load average {report['load_start']} at the start: other work shared the cores).", "",
           "```bash", report["command"], "```", "",
           "Relative error ||g_c - g|| / ||g|| of the parameter gradients of one training step with the "
           "saved activations compressed (g_c) against the uncompressed step (g) on the same batch and weights, "
           "with the same activation checkpointing (so only compression differs). Inputs: "
           + DATA_TEXT[s["data"]] + f"; weights as initialised (seed {s['seed']}), training mode. "
           "Each figure is the mean over "
           f"{s['draws']} draws of the stochastic rounding ± their standard deviation. `overall`: all parameters "
           "as one vector; `median`/`max`: over the parameters; stages: stem = conv1 + bn1, layer1..4, fc. A saved "
           "tensor under 4096 elements stays uncompressed (BatchNorm statistics; the fc input of ResNet-18 at "
           "these batches), so such a layer's weight gradient can be exact.", "",
           f"`mean of {s['draws']}`: the error of the mean of the {s['draws']} compressed gradients; "
           f"`× √{s['draws']}` = that error × √{s['draws']} ÷ the single-draw error: 1 when the error is "
           "variance only (it averages away like minibatch noise), √K if it were all bias. `bias`/`noise`: "
           "the split of the single-draw error from E‖g_c − g‖² = b² + v and ‖mean_K − g‖² = b² + v/K "
           "(one sample of each: rough).", "",
           "`SGD noise`: ||g(B1) - g(B2)|| / ||g(B1)|| for two uncompressed batches of the same size: the "
           "minibatch noise the compression error adds to (≈ √2 = 141 % when the two gradients share nothing). "
           "Both are measured at these small batches and at initialisation; both change with the batch size "
           "and in training, so read them side by side, not as the figures of a large-batch run.", ""]
    for m in report["models"]:
        sp = m["spec"]
        out += [f"## {m['model']}, {sp['stem']} stem, {sp['size']} px, batch {sp['batch']}", ""]
        noise = m["sgd_noise"]
        out.append(f"SGD noise (two batches of {sp['batch']}): overall {_pct(noise['overall'])}, median over "
                   f"parameters {_pct(noise['median'])}, max {_pct(noise['max'])}.")
        if m.get("checkpoint_vs_plain"):
            out.append("Uncompressed, checkpointed vs not: " + ", ".join(
                f"{p} {v:.1e}" for p, v in m["checkpoint_vs_plain"].items()) + " (relative, overall).")
        out += ["", f"| checkpointing | mode | overall | median | max | mean of {s['draws']} | × √{s['draws']} "
                "| bias | noise | s/step |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            out.append(f"| {r['policy']} | {r['mode']} | {_pct(r['overall'], r['overall_sd'])} | "
                       f"{_pct(r['median'], r['median_sd'])} | {_pct(r['max'], r['max_sd'])} | {_pct(r['mean_k'])} | "
                       f"{r['mean_k_x_sqrt_k']:.2f} | {_pct(r.get('bias'))} | {_pct(r.get('noise'))} | "
                       f"{r['seconds_per_step']:.2f} |")
        out += ["", "Per stage (overall error of the stage's parameters, mean ± sd over draws):", "",
                "| checkpointing | mode | " + " | ".join(STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
        for r in m["rows"]:
            out.append(f"| {r['policy']} | {r['mode']} | "
                       + " | ".join(_pct(r[k], r[k + "_sd"]) for k in STAGES) + " |")
        out += ["", "SGD noise per stage: " + ", ".join(f"{k} {_pct(noise[k])}" for k in STAGES) + ".", ""]
    out += [f"Per parameter: `{report['csv']}` (mean and sd of the relative error over the draws, and the "
            "error of the mean of the draws).", ""]
    return "\n".join(out)


def machine(threads: int) -> dict:
    from _memory_report import cpu_name  # benchmarks/, beside this file

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def write(out: Path, report: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "compression_gradients"
    paths = [stem.with_suffix(".md"), stem.with_suffix(".json"), stem.with_suffix(".csv")]
    params = [p for m in report["models"] for p in m["params"]]
    tmp = [p.with_name(f".{p.name}.tmp") for p in paths]
    tmp[0].write_text(render(report))
    tmp[1].write_text(json.dumps({**report, "models": [{k: v for k, v in m.items() if k != "params"}
                                                       for m in report["models"]]}, indent=1))
    with tmp[2].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(params[0]))
        w.writeheader()
        w.writerows(params)
    for t, p in zip(tmp, paths):
        os.replace(t, p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks", help="folder for the .md/.json/.csv")
    ap.add_argument("--draws", type=int, default=8, help="compressed gradients per setting (K), at least 2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--data", choices=("digits", "noise"), default="digits",
                    help="digits: scikit-learn's handwritten digits (default); noise: N(0, 1) images, random labels")
    ap.add_argument("--smoke", action="store_true", help="one tiny model (seconds)")
    args = ap.parse_args(argv)
    if args.draws < 2:
        ap.error(f"--draws {args.draws}: give at least 2 (the spread and the mean of K need two)")
    if args.threads < 1:
        ap.error(f"--threads {args.threads}: give a positive number")
    torch.set_num_threads(args.threads)
    started, cpu0, load_start = time.perf_counter(), time.process_time(), machine(1)["load_average"]
    command = " ".join(["python benchmarks/compression_gradients.py", *(sys.argv[1:] if argv is None else argv)])
    models = []
    for spec in SMOKE if args.smoke else FULL:
        t0 = time.perf_counter()
        models.append(measure_model(spec, draws=args.draws, data=args.data))
        print(f"[compression_gradients] {spec.name} {spec.size} px: {time.perf_counter() - t0:.0f} s", flush=True)
    report = {"benchmark": "compression_gradients", "date": dt.datetime.now(dt.timezone.utc).isoformat("T", "seconds"),
              "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ
                          else "") + command,
              "machine": machine(args.threads),
              "settings": {"draws": args.draws, "seed": 0, "data": args.data, "modes": list(MODES),
                           "policies": list(POLICIES), "smoke": args.smoke},
              "csv": "compression_gradients.csv", "wall_s": time.perf_counter() - started,
              "cpu_s": time.process_time() - cpu0,
              "load_start": load_start, "models": models}
    paths = write(args.out, report)
    print(f"[compression_gradients] wrote {', '.join(map(str, paths))} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
