"""``Config.validate``: every refusal of settings that cannot work, with the numbers and what to
change, kept out of schema.py so the declarations stay readable."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from resnet_scale.config.errors import ConfigError
from resnet_scale.config.names import check_run_name
from resnet_scale.config.values import coerce_value, field_type, split_trackers

#: Seeds go to Python's, numpy's and torch's generators; numpy takes [0, 2**32).
SEED_MAX = 2**32 - 1
#: Blocks in one stage: ResNet-1202, the deepest of He et al. 2016, has 200.
MAX_BLOCKS_PER_STAGE = 1000
#: DataLoader worker processes per loader.
MAX_WORKERS = 1024
#: Synthetic classes: more than any image data set has (ImageNet-21k: 21,841).
MAX_SYNTHETIC_CLASSES = 100_000

#: Settings that say the same thing two ways: at most one of each pair may be set.
ALTERNATIVES = (("memory.micro_batch_size", "memory.grad_accum_steps"),)

if TYPE_CHECKING:
    from resnet_scale.config.schema import Config


def _check_numbers(cfg: Config) -> None:
    """Every number of every section is finite and fits in 64 bits, however it was set: flags and
    files are refused by ``values.py`` as they are read, a Config built in code is checked here."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            tp, _ = field_type(type(sub), f.name)
            value = getattr(sub, f.name)
            if tp in (int, float) and value is not None:
                coerce_value(type(sub), f, value, "--" + f.metadata.get("flag", f.name).replace("_", "-"))


def _check_sizes(cfg: Config) -> None:
    """Counts that are numbers but not sensible ones: refused with the limit and why."""
    m, d, t = cfg.model, cfg.data, cfg.train
    layers, _ = cfg.layers()
    if max(layers) > MAX_BLOCKS_PER_STAGE:
        given = f"--layers {','.join(map(str, layers))}" if m.layers else f"--depth {m.depth}"
        raise ConfigError(f"{given} puts {max(layers):,} blocks in one stage; at most {MAX_BLOCKS_PER_STAGE:,} "
                          "are built (ResNet-1202, the deepest of He et al. 2016, has 200).")
    if not 0 <= t.seed <= SEED_MAX:
        raise ConfigError(f"--seed {t.seed} must be in [0, {SEED_MAX}] (the range numpy's generator takes).")
    if d.num_workers > MAX_WORKERS:
        raise ConfigError(f"--num-workers {d.num_workers} would start that many processes per loader; use at "
                          f"most {MAX_WORKERS} (about the number of CPU cores is plenty).")
    if d.synthetic_classes > MAX_SYNTHETIC_CLASSES:
        raise ConfigError(f"--synthetic-classes {d.synthetic_classes} is more than any image data set has; "
                          f"use at most {MAX_SYNTHETIC_CLASSES:,}.")


def check_config(cfg: Config) -> None:
    """Raise ConfigError for the first setting that cannot work."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _check_numbers(cfg)
    cfg.layers()
    split_trackers(t.tracker)  # one known name, or several: wandb,tensorboard
    if m.zero_init_residual and m.block == "plain":
        raise ConfigError(
            "--zero-init-residual zeroes the last BatchNorm of a residual branch, but plain blocks "
            "have no shortcut: it would zero the whole signal. Drop --zero-init-residual or use "
            "--block basic/bottleneck."
        )
    if d.source == "imagefolder" and not d.data_dir:
        raise ConfigError("--data imagefolder reads train/ and test/ class folders: give --data-dir PATH.")
    if d.image_size is not None and d.image_size < 8:
        raise ConfigError(f"--image-size {d.image_size} is too small; use 8 or more pixels.")
    size = cfg.image_size()
    if cfg.stem() == "imagenet" and size < 32:
        raise ConfigError(
            f"--stem imagenet downsamples 32x before the last stage; --image-size {size} is too small. "
            "Use --stem cifar or --image-size 32 or more."
        )
    if d.crop_padding is not None and not 0 <= d.crop_padding < size:
        raise ConfigError(f"--crop-padding {d.crop_padding} must be in [0, {size}) for {size}-px images.")
    for name, value, low in (
        ("--synthetic-train-samples", d.synthetic_train_samples, 1),
        ("--synthetic-test-samples", d.synthetic_test_samples, 1),
        ("--synthetic-classes", d.synthetic_classes, 2),
        ("--epochs", t.epochs, 1),
        ("--batch-size", t.batch_size, 1),
        ("--log-every", t.log_every, 1),
        ("--eval-every", t.eval_every, 1),
        ("--num-workers", d.num_workers, 0),
        ("--keep-checkpoints", t.keep_checkpoints, 1),
        ("--max-bad-steps", t.max_bad_steps, 1),
    ):
        if value < low:
            raise ConfigError(f"{name} {value} must be at least {low}.")
    _check_sizes(cfg)
    if cfg.memory.micro_batch_size is not None and cfg.memory.grad_accum_steps is not None:
        raise ConfigError(f"--micro-batch-size {cfg.memory.micro_batch_size} and --grad-accum-steps "
                          f"{cfg.memory.grad_accum_steps} both set the micro-batch; give one of them (micro-batch = "
                          "per-device batch / accumulation steps).")
    if cfg.memory.grad_accum_steps is not None and cfg.memory.grad_accum_steps < 1:
        raise ConfigError(f"--grad-accum-steps {cfg.memory.grad_accum_steps} must be at least 1 (1: no accumulation).")
    if d.in_memory_limit_gib <= 0:
        raise ConfigError(f"--in-memory-limit-gib {d.in_memory_limit_gib} must be positive.")
    if t.target_accuracy is not None and not 0 < t.target_accuracy <= 1:
        raise ConfigError(f"--target-accuracy {t.target_accuracy} must be in (0, 1], e.g. 0.85 for 85%.")
    if t.checkpoint_every is not None and t.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every {t.checkpoint_every} must be at least 1 step.")
    if t.checkpoint_every_minutes is not None and not t.checkpoint_every_minutes > 0:
        raise ConfigError(f"--checkpoint-every-minutes {t.checkpoint_every_minutes} must be positive, e.g. 30.")
    if t.resume not in (None, "auto") and t.run_name is not None:
        owner = Path(t.resume).resolve().parent.parent.name  # <output>/<run>/checkpoints/step-N
        if owner != t.run_name:
            raise ConfigError(f"--resume {t.resume} is a checkpoint of run {owner!r}, not of --run-name "
                              f"{t.run_name!r}; a resumed run continues in its own folder. Drop --run-name.")
    if t.resume == "auto" and t.run_name is None:
        raise ConfigError("--resume auto continues the run named by --run-name; give --run-name NAME "
                          "(or --resume <run>/checkpoints/step-N).")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"--max-steps {t.max_steps} must be at least 1 (or omit it to use --epochs).")
    if not 0 < o.lr < 3.4e38:  # a float32 weight update overflows beyond that
        raise ConfigError(f"--lr {o.lr} must be positive and finite (e.g. 0.1).")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"--momentum {o.momentum} must be in [0, 1).")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("--nesterov needs --momentum > 0; add --no-nesterov or set --momentum 0.9.")
    if o.weight_decay < 0:
        raise ConfigError(f"--weight-decay {o.weight_decay} must be >= 0.")
    if not 0 <= o.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing {o.label_smoothing} must be in [0, 1).")
    if o.warmup_epochs < 0:
        raise ConfigError(f"--warmup-epochs {o.warmup_epochs} must be >= 0.")
    if o.max_grad_norm is not None and o.max_grad_norm <= 0:
        if o.max_grad_norm == 0:
            raise ConfigError("--max-grad-norm 0 would clip every gradient to zero (no update at all); to "
                              "train without clipping leave --max-grad-norm out (or give --max-grad-norm none), "
                              "to clip give a positive norm such as 1.0.")
        raise ConfigError(f"--max-grad-norm {o.max_grad_norm} must be positive: a negative norm would turn "
                          "every step around (gradient ascent). Give e.g. 1.0, or leave it out for no clipping.")
    dist = cfg.distributed
    if dist.zero_stage is not None and not 0 <= dist.zero_stage <= 3:
        raise ConfigError(f"--zero-stage {dist.zero_stage} does not exist; DeepSpeed ZeRO stages are 0, 1, 2 and 3.")
    if dist.distributed == "ddp" and (dist.zero_stage or dist.offload not in (None, "none") or dist.ds_config):
        raise ConfigError(
            "--distributed ddp cannot use --zero-stage >= 1, --offload or --ds-config (DeepSpeed settings); "
            "use --distributed deepspeed or auto."
        )
    if cfg.engine() == "deepspeed" and cfg.memory.precision == "fp16":
        raise ConfigError(
            "--precision fp16 under DeepSpeed would cast BatchNorm to fp16; use --precision bf16 "
            "(DeepSpeed's torch autocast, BatchNorm kept fp32) or fp32."
        )
    if cfg.memory.oom_recovery and cfg.distributed.sync_bn:
        raise ConfigError("--oom-recovery cannot be combined with --sync-bn: synchronised BatchNorm talks to "
                          "the other ranks inside the forward pass, where a rank that ran out of memory is missing.")
    if cfg.memory.oom_recovery and cfg.engine() == "deepspeed":
        raise ConfigError("--oom-recovery redoes steps itself, DeepSpeed runs its own step; use it with "
                          "DDP or one process, or plan for the budget with --max-memory instead.")
    if t.run_name is not None:
        check_run_name(t.run_name)
