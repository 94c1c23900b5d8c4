"""DeepSpeed configs: the one place where the command line fills a DS JSON config.

Every value the command line decides is filled here from the flags. In the JSON such a value is
either ``"auto"`` (or absent) — then the flag's value is used — or concrete, and then it must
agree with the flags: a contradiction is an error naming both, raised before any process group
starts. Keys starting with ``_`` are comments and are dropped.

Bucket sizes (``zero_optimization.reduce_bucket_size``/``allgather_bucket_size``, elements): when
``"auto"`` or absent, the model's parameter count, at most 50M (:func:`bucket_elements`), filled
by :func:`size_buckets` once the model exists (``accelerator.prepare``). DeepSpeed allocates its reduce buckets at the
configured size every step whatever the model's size, and its own default (5e8 elements, 2 GB fp32
per buffer) is more than a ResNet-50's whole model states; a bucket larger than all the gradients
together only holds memory (and on a CPU the two 200 MB buffers of a fixed 50M made a tiny model's
step eight times slower).

Precision: bf16 runs under DeepSpeed's ``torch_autocast`` mode; DeepSpeed's ``bf16``/``fp16``
sections cast the whole model, BatchNorm included, and BatchNorm then fails on CPU and loses
its fp32 statistics, so they are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resnet_scale.config import Config, ConfigError
from resnet_scale.memory.settings import MemorySettings

#: The templates for --zero-stage N without --ds-config: package data (resnet_scale/ds_configs, in a
#: checkout a link to the top-level ds_configs/, in a wheel a copy of it), so an installed package has them.
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
_OFFLOAD_DEVICES = ("none", "cpu", "nvme")
#: The largest bucket "auto" gives: 50M elements, 200 MB in fp32.
BUCKET_CAP = 50_000_000
_BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size")


def bucket_elements(value: Any, num_params: int) -> int:
    """The elements of one DeepSpeed bucket: ``value`` from the config, or for ``"auto"``/absent
    (None) the model's parameter count capped at :data:`BUCKET_CAP`."""
    if value is None or value == "auto":
        return max(1, min(BUCKET_CAP, int(num_params)))
    return int(value)


def size_buckets(ds_config: dict[str, Any], num_params: int) -> None:
    """Fill the "auto" (or absent) bucket sizes of a built config for a model of ``num_params``."""
    zero = ds_config.setdefault("zero_optimization", {})
    for key in _BUCKET_KEYS:
        zero[key] = bucket_elements(zero.get(key), num_params)


def require_deepspeed() -> None:
    """DeepSpeed and transformers (Accelerate's DeepSpeed plugin imports it) must be installed."""
    import importlib.util

    missing = [m for m in ("deepspeed", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"DeepSpeed was asked for (--distributed/--zero-stage/--offload/--ds-config) but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            "pip install 'resnet-scale[deepspeed]', or train with --distributed ddp."
        )


def _strip_comments(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_comments(v) for k, v in value.items() if not str(k).startswith("_")}
    return value


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds-config {path}: no such file (templates are in {TEMPLATE_DIR}).")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--ds-config {path} is not valid JSON: {err}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--ds-config {path} must hold a JSON object.")
    return _strip_comments(raw)


class _Filler:
    """Fill or check one key at a time; ``where`` names the file in messages."""

    def __init__(self, config: dict[str, Any], where: str):
        self.config, self.where = config, where

    def fill(self, dotted: str, value: Any, flag: str, kind: type | tuple[type, ...]) -> None:
        *parents, key = dotted.split(".")
        node = self.config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{self.where}: '{part}' must be an object.")
        current = node.get(key, "auto")
        if current == "auto":
            node[key] = value
            return
        if isinstance(current, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(f"{self.where}: {dotted} must be {self._kind(kind)}, got {current!r}.")
        if not isinstance(current, kind):
            raise ConfigError(f"{self.where}: {dotted} must be {self._kind(kind)} or \"auto\", got {current!r}.")
        if current != value:
            raise ConfigError(
                f"{self.where} sets {dotted} = {current!r} but {flag} gives {value!r}; "
                f"set it to \"auto\" in the file or change the flag."
            )

    @staticmethod
    def _kind(kind) -> str:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false"}[k] for k in kinds)


def resolve_stage_and_offload(cfg: Config) -> tuple[int, str, dict[str, Any]]:
    """(ZeRO stage, offload, the loaded JSON) from --zero-stage/--offload/--ds-config."""
    d = cfg.distributed
    if d.ds_config:
        raw, where = load_ds_config(d.ds_config), f"--ds-config {d.ds_config}"
    elif d.zero_stage is not None:
        raw, where = load_ds_config(TEMPLATE_DIR / f"zero{max(1, d.zero_stage)}.json"), f"ds_configs/zero{max(1, d.zero_stage)}.json"
        raw["zero_optimization"]["stage"] = "auto"
    else:
        raise ConfigError("--distributed deepspeed needs --zero-stage 0..3 or --ds-config PATH.")
    zero = raw.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be an object.")
    file_stage = zero.get("stage", "auto")
    if file_stage != "auto" and (isinstance(file_stage, bool) or not isinstance(file_stage, int) or not 0 <= file_stage <= 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {file_stage!r}.")
    stage = d.zero_stage if d.zero_stage is not None else (file_stage if file_stage != "auto" else 0)

    def device(section: str) -> str:
        value = (zero.get(section) or {}).get("device", "auto") if isinstance(zero.get(section, {}), dict) else "bad"
        if value != "auto" and value not in _OFFLOAD_DEVICES:
            raise ConfigError(f"{where}: zero_optimization.{section}.device must be one of {', '.join(_OFFLOAD_DEVICES)}, got {value!r}.")
        return value

    opt_dev, param_dev = device("offload_optimizer"), device("offload_param")
    if d.offload is not None:
        offload = d.offload
    else:
        offload = "optimizer+params" if param_dev in ("cpu", "nvme") else "optimizer" if opt_dev in ("cpu", "nvme") else "none"
    if offload != "none" and stage == 0:
        raise ConfigError(f"--offload {offload} needs ZeRO stage >= 1 (offloading parameters needs stage 3); add --zero-stage.")
    if offload == "optimizer+params" and stage != 3:
        raise ConfigError(f"--offload optimizer+params offloads parameters, which needs --zero-stage 3 (got stage {stage}).")
    return stage, offload, raw


def build_ds_config(cfg: Config, memory: MemorySettings, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run: no "auto" left but the bucket sizes, which need the model
    (:func:`size_buckets`)."""
    stage, offload, raw = resolve_stage_and_offload(cfg)
    where = f"--ds-config {cfg.distributed.ds_config}" if cfg.distributed.ds_config else f"ds_configs/zero{max(1, stage)}.json"
    for section in ("bf16", "fp16"):
        if isinstance(raw.get(section), dict) and raw[section].get("enabled") not in (False, "auto", None):
            raise ConfigError(
                f"{where} enables DeepSpeed's \"{section}\" section, which casts BatchNorm to {section}; "
                "remove it and use --precision bf16 (DeepSpeed torch_autocast keeps BatchNorm fp32)."
            )
        raw.pop(section, None)
    f = _Filler(raw, where)
    batch_flag = f"--batch-size {cfg.train.batch_size} over {world_size} processes"
    f.fill("train_batch_size", cfg.train.batch_size, "--batch-size", int)
    f.fill("train_micro_batch_size_per_gpu", memory.micro_batch_size, f"{batch_flag} (--micro-batch-size)", int)
    f.fill("gradient_accumulation_steps", memory.accumulation_steps, f"{batch_flag} and the micro-batch", int)
    f.fill("gradient_clipping", float(cfg.optim.max_grad_norm or 0.0), "--max-grad-norm", (int, float))
    f.fill("zero_optimization.stage", stage, "--zero-stage", int)
    f.fill("zero_optimization.offload_optimizer.device", "cpu" if offload != "none" else "none", "--offload", str)
    f.fill("zero_optimization.offload_param.device", "cpu" if offload == "optimizer+params" else "none", "--offload", str)
    zero = raw.get("zero_optimization", {})
    for key in _BUCKET_KEYS:
        value = zero.get(key, "auto")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1
                                or value != int(value)):
            raise ConfigError(f"{where}: zero_optimization.{key} must be a whole number of elements >= 1 or "
                              f"\"auto\" (the model's parameter count, at most {BUCKET_CAP:,}), got {value!r}.")
    bf16 = memory.precision == "bf16"
    f.fill("torch_autocast.enabled", bf16, "--precision", bool)
    f.fill("torch_autocast.dtype", "bfloat16" if bf16 else "float32", "--precision", str)
    if not bf16:
        raw.pop("torch_autocast")
    if offload != "none":
        raw.setdefault("zero_force_ds_cpu_optimizer", False)  # keep our SGD: no JIT-compiled DeepSpeedCPUAdam
    return raw
