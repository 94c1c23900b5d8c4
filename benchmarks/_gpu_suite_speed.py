"""Sections 1 and 2 of ``benchmarks/gpu_suite.py`` (throughput), and building the resnet_scale
step outside its loop (section 4).

Every resnet_scale row is one ``resnet-scale train`` run (``LoopBench``): its loop's figure (what
users get) and, beside it, the same run's optimizer step alone, so the loop's overhead shows as
``loop_vs_step``. Timing in windows: see ``_gpu_suite_timing.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from _gpu_suite_report import Goal, add_flops, peak_bf16_tflops
from _gpu_suite_timing import LoopBench, drain, flops_per_image, make_cfg, precision_label, time_windows
from resnet_scale.config import Config, ConfigError
from resnet_scale.data import build_datasets
from resnet_scale.memory.settings import apply_memory_transforms, resolve_memory
from resnet_scale.models import build_resnet
from resnet_scale.train.optim import build_optimizer
from resnet_scale.train.step import train_step

__all__ = ["make_cfg", "build_engine", "run_cifar", "run_r50", "model_flags", "device_peak"]


def device_peak(ops) -> float | None:
    """The device's dense bf16 peak (TFLOP/s) for MFU; None on a CPU or an unknown GPU."""
    return peak_bf16_tflops(torch.cuda.get_device_name(ops.device)) if ops.cuda else None


@dataclass
class Engine:
    """The resnet_scale training step outside the loop: resolve_memory -> build_accelerator ->
    build_resnet -> build_optimizer -> apply_memory_transforms -> prepare -> train_step."""

    flags: list[str]
    cfg: Config
    memory: object
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        train_step(self.accelerator, self.model, self.optimizer, x, y,
                   accumulation_steps=self.memory.accumulation_steps)


def build_engine(flags: list[str], device: str, num_classes: int, *,
                 weights_channels_last: bool | None = None) -> Engine:
    """``weights_channels_last``: None = as the trainer (channels_last weights except under ZeRO,
    whose flat buffers keep them NCHW); False/True forces the weights' format."""
    from accelerate.state import AcceleratorState

    from resnet_scale.distributed.accelerator import build_accelerator, prepare

    AcceleratorState._reset_state(True)  # one Accelerator per configuration, in one process
    flags = [*flags, "--device", device, "--tracker", "none"]
    cfg = make_cfg(flags)
    memory = resolve_memory(cfg, world_size=1, device_type=device)
    accelerator = build_accelerator(cfg, memory)
    torch.manual_seed(0)
    model = build_resnet(cfg.model.block, cfg.model.depth, stem=cfg.stem(), num_classes=num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    cl = weights_channels_last
    if cl is None:
        cl = memory.channels_last and cfg.engine() != "deepspeed"
    model = apply_memory_transforms(model, dataclasses.replace(memory, compile=False, channels_last=cl))
    model, optimizer = prepare(accelerator, model, optimizer)
    return Engine(flags, cfg, memory, accelerator, model, optimizer)


def plain_step(model, opt, x, y) -> None:
    """The common example's step: fp32, no autocast, no loss scaling."""
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def plain_model(spec, device):
    torch.manual_seed(0)
    model = build_resnet(spec["block"], spec["depth"], stem=spec["stem"], num_classes=spec["classes"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model.train(), opt


def model_flags(spec: dict, batch: int) -> list[str]:
    return ["--block", spec["block"], "--depth", str(spec["depth"]), "--stem", spec["stem"],
            "--image-size", str(spec["size"]), "--batch-size", str(batch)]


def loop_row(label: str, flags: list[str], spec: dict, timing: tuple[int, int, int], ops, *,
             compile_with: str | None = None, judge=None, goals=None, profile=None) -> dict:
    """One resnet_scale setting: a ``resnet-scale train`` run, its loop and its step timed.
    ``judge(row) -> [Goal]`` runs while the run is alive, so ``profile`` can profile its step.
    A setting the package refuses on this device (fp16 on a CPU) is a row that says why."""
    b = int(flags[flags.index("--batch-size") + 1])
    precision = flags[flags.index("--precision") + 1]
    row = {"config": label, "precision": precision_label(precision, ops.device.type), "batch": b,
           "flags": " ".join(flags)}
    try:
        bench = LoopBench(flags, device=ops.device.type, spec=spec, batch=b, timing=timing, ops=ops,
                          compile_with=compile_with)
        with bench:
            step = bench.step_figures()
            loop = bench.loop_figures()
            fpi, peak = flops_per_image(spec), device_peak(ops)
            row.update({k: loop[k] for k in ("windows", "steps_per_window", "img_per_s", "img_per_s_min",
                                              "img_per_s_max", "spread", "ms_per_step", "peak_gib")})
            row.update(step_img_per_s=step["img_per_s"], loop_vs_step=loop["img_per_s"] / step["img_per_s"],
                       warmup_s=step["warmup_s"], warmup_extra_s=step["warmup_extra_s"],
                       compile_s=step["warmup_extra_s"] if "--compile" in flags else None,
                       setup_s=loop["setup_s"], loop=loop, step=add_flops(step, fpi, peak))
            add_flops(row, fpi, peak)
            if judge is not None:
                new = judge(row)
                goals += new
                profile(new, bench.step, label)
    except ConfigError as err:
        row["skipped"] = str(err)
    return row


THROUGHPUT_COLUMNS = ["config", "precision", "batch", "windows", "img_per_s", "img_per_s_min", "img_per_s_max",
                      "step_img_per_s", "loop_vs_step", "warmup_s", "compile_s", "tflops", "mfu", "skipped"]

# ----------------------------------------------------------------------------- 1. CIFAR ResNet-18


class PILCifar(torch.utils.data.Dataset):
    """torchvision ``CIFAR10`` as the common examples use it: uint8 HWC arrays in memory, a PIL
    image made per item, CPU transforms (here on synthetic images: nothing can be downloaded)."""

    def __init__(self, images_nhwc, labels, transform):
        self.data, self.targets, self.transform = images_nhwc, labels, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


def _cycle(make_iter, batch: int):
    """Batches of ``batch`` images forever, epoch after epoch; a short last batch is skipped
    (a new shape would make cuDNN autotune and torch.compile recompile inside the timed steps)."""
    while True:
        yield from ((x, y) for x, y in make_iter() if len(y) == batch)


def _timing(cfg: dict, key: str, compiled: bool) -> tuple[int, int, int]:
    warmup, windows, per_window = cfg[key]
    return warmup + (cfg["compile_warmup"] if compiled else 0), windows, per_window


def _baseline_row(cfg: dict, spec: dict, timing: tuple[int, int, int], ops, workers: int, prefetch: int) -> dict:
    import torchvision.transforms as T

    b, dev = spec["batch"], ops.device
    train, _ = build_datasets("synthetic", image_size=spec["size"], synthetic_samples=(cfg["cifar_samples"], 1),
                              num_classes=spec["classes"])
    pad = spec["size"] // 8
    tf = T.Compose([T.RandomCrop(spec["size"], padding=pad), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(train.mean, train.std)])
    ds = PILCifar(train.images.permute(0, 2, 3, 1).contiguous().numpy(), train.labels.numpy(), tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=b, shuffle=True, num_workers=workers, drop_last=True,
                                         pin_memory=ops.cuda, persistent_workers=workers > 0,
                                         prefetch_factor=prefetch if workers else None)
    batches = _cycle(lambda: iter(loader), b)
    model, opt = plain_model(spec, dev)

    def base_step():
        x, y = next(batches)
        plain_step(model, opt, x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))

    try:
        warmup, windows, per_window = timing
        fig = time_windows(base_step, warmup=warmup, windows=windows, per_window=per_window, ops=ops, batch=b,
                           before_timing=lambda: drain(batches, workers * prefetch))
    finally:
        batches.close()  # ends the loader's iterator: its workers exit
        loader = batches = model = opt = None
        ops.free()
    fig["step_img_per_s"] = fig["img_per_s"]  # its step is its loop
    return add_flops({"config": f"baseline: PIL DataLoader ({workers} workers), NCHW eager",
                      "precision": precision_label("fp32", dev.type), "drained_batches": workers * prefetch,
                      **fig, "loop_vs_step": 1.0}, flops_per_image(spec), device_peak(ops))


def run_cifar(cfg: dict, ops, goals: list[Goal], profile, sec: dict) -> dict:
    """The seed-style baseline (fp32 NCHW eager, PIL transforms in DataLoader workers) against
    ``resnet-scale train`` eager and compiled. ``sec`` is filled as rows are measured."""
    spec, b = cfg["cifar"], cfg["cifar"]["batch"]
    warmup, windows, per_window = cfg["cifar_timing"]
    workers, prefetch = cfg["baseline_workers"], 2
    sec.update(title=f"Throughput: CIFAR-stem {spec['name']}, {spec['size']} px, batch {b}", columns=THROUGHPUT_COLUMNS
               + ["vs_baseline"], rows=[], notes=[
                   f"baseline (the common example): a torch Dataset of PIL images ({cfg['cifar_samples']} synthetic "
                   "uint8 CIFAR-sized images) with RandomCrop(padding) + RandomHorizontalFlip + ToTensor + Normalize, "
                   f"DataLoader num_workers={workers}, pin_memory, fp32 NCHW eager, SGD nesterov; its loop is "
                   f"`for x, y in loader: step`. The {workers * prefetch} batches its workers prefetched during the "
                   "warm-up are taken and dropped before its timer starts",
                   "resnet_scale rows: `resnet-scale train --data synthetic` (DeviceLoader: augmentation on the "
                   f"device), one epoch = {per_window * (windows + 1)} steps; goals are judged on the loop figure"])
    rows = sec["rows"]
    rows.append(_baseline_row(cfg, spec, (warmup, windows, per_window), ops, workers, prefetch))
    flags = model_flags(spec, b) + ["--precision", "bf16", "--channels-last"]
    for compiled in (False, True):
        mode = "compiled" if compiled else "eager"

        def judge(row, compiled=compiled, mode=mode):
            row["vs_baseline"] = row["img_per_s"] / rows[0]["img_per_s"]
            new = [Goal("1", f"CIFAR-stem {spec['name']} {mode} throughput", row["img_per_s"], ">=",
                        45000 if compiled else 30000, "img/s"),
                   Goal("1", f"CIFAR-stem {spec['name']} {mode} MFU", row["mfu"], ">=", 0.25 if compiled else 0.15, "%",
                        "" if row["mfu"] is not None else "no bf16 peak for this device")]
            if not compiled:
                new.append(Goal("1", "eager speed-up over the seed-style baseline", row["vs_baseline"], ">=", 3, "x"))
            return new

        rows.append(loop_row(f"resnet-scale train: bf16, channels_last, {mode}", flags + (["--compile"] if compiled
                             else []), spec, _timing(cfg, "cifar_timing", compiled), ops,
                             compile_with=cfg["compile_backend"] if compiled else None, judge=judge, goals=goals,
                             profile=profile))
    return sec

# ----------------------------------------------------------------------------- 2. ResNet-50


def run_r50(cfg: dict, ops, goals: list[Goal], profile, sec: dict) -> dict:
    """What each switch buys on ResNet-50: fp32, fp16 + loss scaling, bf16 + channels_last, and
    torch.compile, every one a ``resnet-scale train`` run on synthetic 224 px images."""
    spec, b = cfg["r50"], cfg["r50"]["batch"]
    warmup, windows, per_window = cfg["r50_timing"]
    sec.update(title=f"Throughput: {spec['name']}, {spec['size']} px, batch {b}, synthetic data",
               columns=THROUGHPUT_COLUMNS + ["vs_fp32", "peak_gib"], rows=[], notes=[
                   "every row is `resnet-scale train --data synthetic` (DeviceLoader: random crop and flip on the "
                   f"device), one epoch = {per_window * (windows + 1)} steps; goals are judged on the loop figure"])
    rows = sec["rows"]
    base = model_flags(spec, b)
    settings = [("fp32, NCHW, eager", ["--precision", "fp32", "--no-channels-last"], False),
                ("fp16 + loss scaling, NCHW, eager", ["--precision", "fp16", "--no-channels-last"], False),
                ("bf16, channels_last, eager", ["--precision", "bf16", "--channels-last"], False),
                ("bf16, channels_last, compiled", ["--precision", "bf16", "--channels-last", "--compile"], True)]
    for label, extra, compiled in settings:
        judge = None
        if "bf16" in extra:
            def judge(row, compiled=compiled):
                mode = "compiled" if compiled else "eager"
                new = [Goal("2", f"{spec['name']} bf16+CL {mode} throughput", row["img_per_s"], ">=",
                            5000 if compiled else 3500, "img/s")]
                if compiled:
                    new.append(Goal("2", f"{spec['name']} {spec['size']} px compiled MFU", row["mfu"], ">=", 0.20, "%",
                                    "" if row["mfu"] is not None else "no bf16 peak for this device"))
                return new
        rows.append(loop_row(f"resnet-scale train: {label}", base + extra, spec, _timing(cfg, "r50_timing", compiled),
                             ops, compile_with=cfg["compile_backend"] if compiled else None, judge=judge, goals=goals,
                             profile=profile))
    fp32 = rows[0].get("img_per_s")
    for r in rows:
        r["vs_fp32"] = r["img_per_s"] / fp32 if fp32 and r.get("img_per_s") else None
    return sec
