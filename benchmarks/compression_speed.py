"""CPU time of activation compression: a training step (forward + backward + SGD step) with
``--activation-compression int8|int4|int2`` as a ratio to the uncompressed step, and where the
extra time goes.

    OMP_NUM_THREADS=1 python benchmarks/compression_speed.py [--out docs/benchmarks] [--steps 5] [--smoke]

Writes ``compression_speed.md`` and ``compression_speed.json`` to ``--out``.

1. **Step time**: CIFAR ResNet-18 (CIFAR stem, 32 px) and ResNet-50 (ImageNet stem, 224 px) at a
   small batch, fp32: every setting is built (same weights, same batch), warmed up, then
   ``--steps`` rounds time one step of each setting in turn (a shared CPU's drift is spread over
   all settings alike); the median per setting and its ratio to ``none``.
2. **Hooks**: the same step with the pack and unpack hooks timed (``CompressSaved.pack`` /
   ``unpack`` wrapped by this script): the share of the step spent quantizing and restoring.
3. **Parts**: the operations of ``quantize`` / ``dequantize`` and the ReLU mask timed one by one
   on one activation-sized tensor, to show which of them costs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (HERE, ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
import resnet_scale.memory.compression as compression  # noqa: E402
import resnet_scale.memory.quantize as quantize  # noqa: E402
from compression_gradients import Spec, machine  # noqa: E402
from resnet_scale.memory import apply_activation_compression  # noqa: E402

MODES = ("none", "int8", "int4", "int2")
FULL = {"models": [Spec("CIFAR ResNet-18", "basic", 18, "cifar", 32, 10, 16),
                   Spec("ResNet-50", "bottleneck", 50, "imagenet", 224, 1000, 2)],
        "warmup": 2, "parts_shape": (2, 256, 56, 56)}  # ResNet-50's layer1 output at batch 2
SMOKE = {"models": [Spec("basic 1,1,1 (smoke)", "basic", None, "cifar", 8, 10, 4, (1, 1, 1))],
         "warmup": 1, "parts_shape": (4, 16, 16, 16)}


class Runner:
    def __init__(self, spec: Spec, mode: str) -> None:
        torch.manual_seed(0)
        self.model = apply_activation_compression(spec.build().train(), mode)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(spec.batch, 3, spec.size, spec.size, generator=gen)
        self.y = torch.randint(0, spec.classes, (spec.batch,), generator=gen)

    def step(self) -> float:
        started = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()
        return time.perf_counter() - started


class HookClock:
    """Wraps ``CompressSaved.pack`` / ``unpack`` while alive: seconds spent in each."""

    def __enter__(self) -> "HookClock":
        self.pack_s = self.unpack_s = 0.0
        cls = compression.CompressSaved
        self.saved = (cls.pack, cls.__dict__["unpack"])
        pack, unpack = cls.pack, cls.unpack

        def timed_pack(this, t):
            started = time.perf_counter()
            try:
                return pack(this, t)
            finally:
                self.pack_s += time.perf_counter() - started

        def timed_unpack(packed):
            started = time.perf_counter()
            try:
                return unpack(packed)
            finally:
                self.unpack_s += time.perf_counter() - started

        cls.pack, cls.unpack = timed_pack, staticmethod(timed_unpack)
        return self

    def __exit__(self, *exc) -> None:
        compression.CompressSaved.pack, compression.CompressSaved.unpack = self.saved


def step_times(spec: Spec, warmup: int, steps: int) -> list[dict]:
    runners = {m: Runner(spec, m) for m in MODES}
    for r in runners.values():
        for _ in range(warmup):
            r.step()
    times = {m: [] for m in MODES}
    for _ in range(steps):
        for m, r in runners.items():
            times[m].append(r.step())
    hooks = {}
    for m in MODES[1:]:
        with HookClock() as clock:
            wall = runners[m].step()
        hooks[m] = (clock.pack_s, clock.unpack_s, wall)
    base = statistics.median(times["none"])
    rows = []
    for m in MODES:
        med = statistics.median(times[m])
        row = {"model": spec.name, "size": spec.size, "batch": spec.batch, "mode": m, "steps": steps,
               "ms_per_step": 1e3 * med, "min_ms_per_step": 1e3 * min(times[m]),
               "max_ms_per_step": 1e3 * max(times[m]), "ratio": med / base}
        if m in hooks:
            pack_s, unpack_s, wall = hooks[m]
            row.update(pack_ms=1e3 * pack_s, unpack_ms=1e3 * unpack_s, hooked_step_ms=1e3 * wall,
                       hook_share=(pack_s + unpack_s) / wall)
        rows.append(row)
    return rows


def _time(fn, repeat: int = 5) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return 1e3 * statistics.median(samples)


def parts(shape: tuple[int, ...]) -> list[dict]:
    """The pack and unpack hooks on one ReLU output (so with its 1-bit mask), whole and op by op
    as compression.py runs them (ms, median of 5)."""
    torch.manual_seed(0)
    t = torch.relu(torch.randn(shape, requires_grad=True))  # a ReluBackward output: masked
    flat, n, G = t.detach().view(-1), t.numel(), compression.GROUP_SIZE
    groups = flat.view(-1, G)
    rows = [("plain copy of the tensor (one read, one write: the floor)", lambda: flat.clone())]
    for bits in (8, 2):
        packed = compression.CompressSaved(bits).pack(t)
        rows += [(f"int{bits} pack (whole hook: quantize + mask)", lambda b=bits: compression.CompressSaved(b).pack(t)),
                 (f"int{bits} unpack (whole hook: dequantize + mask + copy)",
                  lambda p=packed: compression.CompressSaved.unpack(p))]
    codes, lo, step = quantize.quantize(flat, 8)
    noise = torch.rand_like(groups)
    q = quantize.unpack_bits(codes, 8)
    values = quantize.dequantize(codes, lo, step, 8, n)
    bits01 = F.pad(flat != 0, (0, (-n) % 8)).to(torch.uint8)
    mask = quantize.pack_bits(bits01, 1)
    masked = quantize.restore_relu_(values.clone(), mask, torch.float32)
    rows += [
        ("└ pack: F.pad(flat.float(), ...) (copies even when nothing is padded)",
         lambda: F.pad(flat.float(), (0, 0))),
        ("└ pack: amin + amax per group", lambda: (groups.amin(1, keepdim=True), groups.amax(1, keepdim=True))),
        ("└ pack: torch.rand_like (one fp32 uniform per element)", lambda: torch.rand_like(groups)),
        ("└ pack: (x - lo).div_(step).add_(noise).floor_().clamp_().to(uint8)",
         lambda: groups.sub(lo).div_(step).add_(noise).floor_().clamp_(0, 255).to(torch.uint8)),
        ("└ pack: mask bits: F.pad(flat != 0, ...).to(uint8)",
         lambda: F.pad(flat != 0, (0, (-n) % 8)).to(torch.uint8)),
        ("└ pack: pack_bits(mask, 1)", lambda: quantize.pack_bits(bits01, 1)),
        ("└ unpack: lo + q.float() * step", lambda: (lo + q.view(-1, G).float() * step).view(-1)[:n]),
        ("└ unpack: unpack_bits(mask, 1)", lambda: quantize.unpack_bits(mask, 1)[:n]),
        ("└ unpack: restore_relu_ (mask unpacked, max(v, tiny) * mask, in place)",
         lambda: quantize.restore_relu_(values.clone(), mask, torch.float32)),
        ("└ unpack: empty_strided + copy_", lambda: torch.empty_strided(t.shape, t.stride()).as_strided(
            (n,), (1,)).copy_(masked)),
        ("int2 only: pack_bits", lambda: quantize.pack_bits(q.clamp(0, 3), 2)),
        ("int2 only: unpack_bits", lambda: quantize.unpack_bits(quantize.pack_bits(q.clamp(0, 3), 2), 2)),
    ]
    return [{"part": name, "ms": _time(fn), "numel": n} for name, fn in rows]


def render(report: dict) -> str:
    m = report["machine"]
    out = ["# Activation compression: CPU time", "",
           f"Measured {report['date']} on {m['cpu']} ({m['cores']} cores, {m['threads']} torch thread(s), "
           f"OMP_NUM_THREADS={m['omp_num_threads']}), torch {m['torch']}; wall time {report['wall_s']:.0f} s; load "
           f"average {m['load_average']} (other work shared the cores: the ratios, measured in interleaved "
           "rounds, are the figures to read).", "",
           "```bash", report["command"], "```", "",
           "A training step (fp32 forward, cross-entropy, backward, SGD momentum step) on one resident batch; "
           f"warm-up: {report['settings']['warmup']} step(s) per setting, then {report['settings']['steps']} rounds "
           "that time one step of each setting in turn; median (fastest–slowest). `ratio` = median ÷ the "
           "uncompressed median. `hooks`: one further step with the pack/unpack hooks timed: their ms and share "
           "of that step. The CPU has no fused kernel for this: quantization is plain torch ops.", "",
           "| model | px | batch | mode | ms/step | fastest–slowest | ratio | pack ms | unpack ms | hooks share |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["steps"]:
        hooks = (f"{r['pack_ms']:.0f} | {r['unpack_ms']:.0f} | {100 * r['hook_share']:.0f} %" if "pack_ms" in r
                 else "– | – | –")
        out.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['mode']} | {r['ms_per_step']:.0f} | "
                   f"{r['min_ms_per_step']:.0f}–{r['max_ms_per_step']:.0f} | {r['ratio']:.2f} | {hooks} |")
    shape = "×".join(map(str, report["settings"]["parts_shape"]))
    out += ["", f"## Where the time goes: one ReLU output of {shape} fp32 "
            f"({report['parts'][0]['numel'] * 4 / 2**20:.1f} MiB)", "",
            "Median of 5 (ms). Rows marked └ are the operations of the int8 hooks, each timed alone, in "
            "the order compression.py runs them.", "", "| operation | ms |", "|---|---|"]
    out += [f"| {p['part']} | {p['ms']:.2f} |" for p in report["parts"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks", help="folder for the .md/.json")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--smoke", action="store_true", help="one tiny model (seconds)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        ap.error(f"--steps {args.steps} --threads {args.threads}: give positive numbers")
    torch.set_num_threads(args.threads)
    cfg = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    command = " ".join(["python benchmarks/compression_speed.py", *(sys.argv[1:] if argv is None else argv)])
    rows = []
    for spec in cfg["models"]:
        rows += step_times(spec, cfg["warmup"], args.steps)
        print(f"[compression_speed] {spec.name}: {time.perf_counter() - started:.0f} s", flush=True)
    report = {"benchmark": "compression_speed", "date": dt.datetime.now(dt.timezone.utc).isoformat("T", "seconds"),
              "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ
                          else "") + command, "machine": machine(args.threads),
              "settings": {"steps": args.steps, "warmup": cfg["warmup"], "parts_shape": list(cfg["parts_shape"]),
                           "smoke": args.smoke, "precision": "fp32", "checkpointing": "none"},
              "steps": rows, "parts": parts(cfg["parts_shape"])}
    report["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    md, js = args.out / "compression_speed.md", args.out / "compression_speed.json"
    for path, text in ((md, render(report)), (js, json.dumps(report, indent=1))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(f"[compression_speed] wrote {md} and {js} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
