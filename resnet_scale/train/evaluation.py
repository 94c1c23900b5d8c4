"""Evaluating a run's saved weights on the test split (``resnet-scale eval``): the run's config.json
says which model to build and which data to read, and the test split is prepared exactly as the
run's own test loader prepared it (the train split's normalisation, the run's image size, batch,
precision and memory format), so ``--weights final`` gives the run's final test accuracy and
``--weights best`` its best one.

The result (loss, accuracy, a confusion matrix) is written to ``<run>/eval-<weights>.json``, a name
no training file has; nothing the run wrote is changed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from resnet_scale.config import Config, ConfigError
from resnet_scale.train.run_dir import (BEST_WEIGHTS, FINAL_WEIGHTS, load_weights, plain_key, read_run_config,
                                        weights_metadata)

WEIGHTS = {"final": FINAL_WEIGHTS, "best": BEST_WEIGHTS}
#: Sources that each name one data set; an image folder may hold a copy of any of them.
_COPY_SOURCE = "imagefolder"


def read_run(run_dir: str | Path) -> tuple[Path, Config, dict[str, Any]]:
    """(the run folder, its config, all of its config.json); ConfigError when it is not a run."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"{run}: no such run folder; give a run's folder, <output-dir>/<run-name> "
                          "(e.g. runs/my-run).")
    path = run / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run} holds no run (no config.json); give the folder of a run, <output-dir>/<run-name>.")
    saved, cfg = read_run_config(path)
    return run, cfg, saved


def weights_file(run: Path, weights: str) -> Path:
    """The run's ``model.safetensors`` (final) or ``model_best.safetensors`` (best), which must exist."""
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r}: choose final or best.")
    path = run / WEIGHTS[weights]
    if path.is_file():
        return path
    if weights == "best":
        raise ConfigError(f"run {run} has no {BEST_WEIGHTS} (it is written at each new best test accuracy: the run "
                          "has not been evaluated yet, or an older resnet-scale trained it); use --weights final.")
    other = " (--weights best evaluates the best weights so far)" if (run / BEST_WEIGHTS).is_file() else ""
    raise ConfigError(f"run {run} has no {FINAL_WEIGHTS}: it has not finished (continue it with --resume auto "
                      f"--run-name {run.name}){other}.")


def _eval_config(cfg: Config, saved: dict[str, Any], source: str | None, data_dir: str | None) -> Config:
    """The run's config with the data asked for: its own source (another folder with --data-dir), or an
    image folder holding the same classes. Another data set is refused: the model's outputs mean the
    run's classes."""
    out = copy.deepcopy(cfg)
    if source is not None and source != cfg.data.source:
        if source != _COPY_SOURCE:
            raise ConfigError(f"data source mismatch: --data {source}, but the run was trained on {cfg.data.source}, "
                              "and a model is evaluated on the test split of the data it learned (its outputs mean "
                              f"those classes). Leave --data out, or give --data {_COPY_SOURCE} --data-dir PATH "
                              "for a copy of the same data as class folders.")
        if not isinstance(saved.get("classes"), list):
            raise ConfigError(f"--data {source}: the run's config.json does not record its classes (an older "
                              "resnet-scale trained it), so another copy of its data cannot be checked; leave "
                              "--data out to evaluate on the run's own data.")
        out.data.image_size = cfg.image_size()  # the run's, whatever the folder's images are
        out.data.source = source
    if data_dir is not None:
        out.data.data_dir = data_dir
    if out.data.source == _COPY_SOURCE and not out.data.data_dir:
        raise ConfigError(f"--data {_COPY_SOURCE} reads train/ and test/ class folders: give --data-dir PATH.")
    return out


def _check_classes(cfg: Config, run_cfg: Config, saved: dict[str, Any], classes: list[str], outputs: int) -> None:
    recorded = saved.get("classes")
    where = f"--data {cfg.data.source}" + (f" --data-dir {cfg.data.data_dir}" if cfg.data.data_dir else "")
    if len(classes) != outputs or isinstance(recorded, list) and list(recorded) != list(classes):
        run_classes = (f"{len(recorded)} classes: {_few(recorded)}" if isinstance(recorded, list)
                       else f"{outputs} classes")
        raise ConfigError(f"data source mismatch: {where} has {len(classes)} classes ({_few(classes)}), the run was "
                          f"trained on {run_cfg.data.source} with {run_classes}; evaluate on data with the run's "
                          "classes, in the same order.")


def _few(names: list[Any]) -> str:
    shown = ", ".join(map(str, names[:6]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


@torch.no_grad()
def _evaluate(model: torch.nn.Module, loader, num_classes: int, autocast) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix over the whole split; the sums ``metrics.evaluate`` makes."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for images, labels in loader:
        if labels.numel() == 0:
            continue
        with autocast():
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        predicted = logits.argmax(1)
        correct += (predicted == labels).sum()
        count += labels.numel()
        confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    total_loss, total_correct, total = (float(v) for v in (loss_sum, correct, count))
    matrix = confusion.view(num_classes, num_classes).tolist()
    return {"loss": total_loss / total, "accuracy": total_correct / total, "samples": int(total),
            "per_class_accuracy": [row[i] / sum(row) if sum(row) else None for i, row in enumerate(matrix)],
            "confusion_matrix": matrix}


def evaluate_run(run_dir: str | Path, *, weights: str = "final", source: str | None = None,
                 data_dir: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Evaluate a run's final or best weights on the test split and write ``eval-<weights>.json`` into
    the run folder; returns what was written. ConfigError (or DataError) for anything that does not fit."""
    from resnet_scale.distributed.accelerator import resolve_device
    from resnet_scale.memory.layout import apply_channels_last
    from resnet_scale.models import build_resnet
    from resnet_scale.train.setup import build_data, make_loader

    run, run_cfg, saved = read_run(run_dir)
    path = weights_file(run, weights)
    cfg = _eval_config(run_cfg, saved, source, data_dir)
    device_type = resolve_device(device)
    state_dict = {plain_key(k): v for k, v in load_weights(path).items()}  # (older --compile runs: prefixed)
    outputs = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else None
    _, test_set = build_data(cfg)
    _check_classes(cfg, run_cfg, saved, list(test_set.classes), outputs or len(test_set.classes))
    model = build_resnet(run_cfg.model.block, run_cfg.model.depth, stem=run_cfg.stem(),
                         num_classes=len(test_set.classes), layers=run_cfg.model.layers,
                         zero_init_residual=run_cfg.model.zero_init_residual)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{path} does not fit the run's model ({' '.join(str(err).split())[:300]}).") from None
    memory = saved.get("memory") or {}
    channels_last, precision = bool(memory.get("channels_last")), memory.get("precision", "fp32")
    model.to(device_type)
    if channels_last:
        apply_channels_last(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else contextlib.nullcontext
    # The batches one process of the run evaluated: its share of the global batch (the same chunks of the split).
    world = saved.get("world_size") if isinstance(saved.get("world_size"), int) and saved["world_size"] > 0 else 1
    loader = make_loader(test_set, cfg, batch_size=max(1, cfg.train.batch_size // world), train=False,
                     device=torch.device(device_type), rank=0, world_size=1, seed=cfg.train.seed,
                     channels_last=channels_last)
    result = {"run": str(run), "weights": weights, "weights_file": path.name,
              **{k: v for k, v in weights_metadata(path).items() if k in ("step", "epoch")},
              "data": cfg.data.source, "data_dir": cfg.data.data_dir, "image_size": cfg.image_size(),
              "precision": precision, "device": device_type,
              **_evaluate(model, loader, len(test_set.classes), autocast), "classes": list(test_set.classes)}
    for key in ("step", "epoch"):
        if key in result:
            result[key] = int(result[key])
    target = run / f"eval-{weights}.json"
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    # One line per list of numbers (a row of the confusion matrix), one line per key otherwise.
    text = re.sub(r"\[\s+([-+\d.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  json.dumps(result, indent=2))
    tmp.write_text(text + "\n")
    os.replace(tmp, target)
    result["written"] = str(target)
    return result
