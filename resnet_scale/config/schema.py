"""One typed config: nested dataclasses, one docstring (``help``) per field.

The command line is generated from these fields (``args.py``), the whole resolved config
is saved with every run (``config.json``) and sent to the trackers. No globals, no ``exec``
(after torchtitan's ``job_config.py``).

Flag names are the field names with dashes (``zero_init_residual`` -> ``--zero-init-residual``),
unique across sections; a field may name its flag explicitly with ``metadata["flag"]`` (the key in
config files stays the field's name: ``memory.checkpointing`` is ``--activation-checkpointing``), and
keep an old flag name a while in ``metadata["aliases"]`` (accepted with a deprecation note). Flags show
``metadata["metavar"]``, else N for an integer and X for a number.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from resnet_scale.config.errors import ConfigError
from resnet_scale.config.values import _shown, coerce_value, split_trackers

BLOCKS = ("plain", "basic", "bottleneck")
STEMS = ("auto", "cifar", "imagenet")
SOURCES = ("cifar10", "cifar100", "digits", "synthetic", "imagefolder")
#: The side images of each source have unless ``--image-size`` asks otherwise (None: no native size).
NATIVE_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "digits": 16, "synthetic": 32, "imagefolder": None}
SCHEDULES = ("cosine", "onecycle", "constant")
AUGMENTS = ("auto", "none", "crop", "flip", "crop+flip")
DEVICES = ("auto", "cpu", "cuda")

# Sources whose images are not mirror-symmetric: horizontal flips would change their meaning.
_NO_FLIP_SOURCES = ("digits",)


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A config field with its documentation (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ModelConfig:
    """Which ResNet to build (``resnet_scale.models.build_resnet``)."""

    block: Literal["plain", "basic", "bottleneck"] = _f(
        "basic",
        "Residual block: 'plain' (two 3x3 convs, no shortcut), 'basic' (two 3x3 convs + shortcut), "
        "'bottleneck' (1x1-3x3-1x1, expansion 4).",
    )
    depth: int = _f(
        18,
        "Depth: 18, 34, 50, 101, 152 name the standard stage layouts for any block; other depths "
        "are the CIFAR family of He et al. 2016 (6n+2 for plain/basic, 9n+2 for bottleneck).",
    )
    layers: Optional[tuple[int, ...]] = _f(
        None, "Explicit blocks per stage, e.g. 3,4,6,3 (4 stages, widths 64..512) or 8,8,8 "
        "(3 stages, widths 16/32/64); overrides --depth."
    )
    stem: Literal["auto", "cifar", "imagenet"] = _f(
        "auto",
        "Stem: 'cifar' (3x3 stride 1, no max-pool), 'imagenet' (7x7 stride 2 + max-pool, "
        "torchvision-compatible); 'auto' picks cifar for images <= 64 px.",
    )
    zero_init_residual: bool = _f(
        False, "Zero the last BatchNorm of each residual branch (Goyal et al. 2017); basic/bottleneck only."
    )


@dataclass
class DataConfig:
    """Where the images come from and how they are fed (``resnet_scale.data``)."""

    source: Literal["cifar10", "cifar100", "digits", "synthetic", "imagefolder"] = _f(
        "digits",
        "Dataset. 'digits' (scikit-learn's 8x8 digits) and 'synthetic' work offline; cifar10/100 "
        "download through Hugging Face datasets unless --data-dir holds them.",
        flag="data",
    )
    data_dir: Optional[str] = _f(
        None, "Folder with cifar-10-batches-py / cifar-100-python, a saved or parquet HF dataset, "
        "or train/ and test/ class folders for imagefolder.", metavar="PATH"
    )
    image_size: Optional[int] = _f(None, "Train/test image side in pixels (default: the source's own size).")
    download: bool = _f(True, "Allow downloading cifar10/cifar100 when --data-dir does not hold them.")
    augment: Literal["auto", "none", "crop", "flip", "crop+flip"] = _f(
        "auto", "Training augmentation on the device; 'auto' = crop+flip, crop only for digits."
    )
    crop_padding: Optional[int] = _f(None, "Zero padding of the random crop in pixels (default: --image-size / 8).")
    in_memory: Literal["auto", "yes", "no"] = _f(
        "auto", "imagefolder only: hold the decoded images on the training device ('auto': when they "
        "take at most --in-memory-limit-gib), else stream them through DataLoader workers."
    )
    in_memory_limit_gib: float = _f(4.0, "Largest uint8 image folder held on the device by --in-memory auto.",
                                    metavar="GIB")
    num_workers: int = _f(4, "DataLoader worker processes per loader when streaming an imagefolder.")
    synthetic_train_samples: int = _f(1024, "Images in the synthetic train split.")
    synthetic_test_samples: int = _f(256, "Images in the synthetic test split.")
    synthetic_classes: int = _f(10, "Classes of the synthetic source.")

    def resolved_augment(self) -> tuple[bool, bool]:
        """(crop, flip) after resolving 'auto' for this source."""
        mode = self.augment
        if mode == "auto":
            mode = "crop" if self.source in _NO_FLIP_SOURCES else "crop+flip"
        return "crop" in mode, "flip" in mode


@dataclass
class OptimConfig:
    """SGD with Nesterov momentum and a per-step learning-rate schedule."""

    lr: float = _f(0.1, "Peak learning rate for the global batch (after warmup); 0.1 suits batch 128 (He et al. 2015).",
                   metavar="RATE")
    momentum: float = _f(0.9, "SGD momentum.")
    nesterov: bool = _f(True, "Nesterov momentum (Sutskever et al. 2013).")
    weight_decay: float = _f(5e-4, "L2 weight decay, not applied to BatchNorm parameters or biases.")
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy loss (Szegedy et al. 2016).")
    max_grad_norm: Optional[float] = _f(None, "Clip the gradient norm to this value (default: no clipping).",
                                        metavar="NORM")
    schedule: Literal["cosine", "onecycle", "constant"] = _f(
        "cosine", "Learning-rate schedule over optimizer steps: linear warmup then cosine to 0, "
        "one-cycle (linear up, linear down), or constant after warmup."
    )
    warmup_epochs: float = _f(1.0, "Linear warmup length in epochs (fractions allowed).", metavar="EPOCHS")


@dataclass
class MemoryConfig:
    """What activations cost and how many are alive at once (``resnet_scale.memory``).

    ``None`` means "not set": fp32 / off / no micro-batching, or what ``--low-memory`` picks."""

    precision: Optional[Literal["fp32", "bf16", "fp16"]] = _f(
        None, "Autocast precision; BatchNorm and the weights stay fp32, fp16 uses loss scaling "
        "(default: fp32; bf16 under --low-memory)."
    )
    channels_last: Optional[bool] = _f(
        None, "Model and every batch in channels_last (NHWC) memory format (default: off; on under --low-memory)."
    )
    checkpointing: Optional[str] = _f(
        None, "Activation checkpointing policy: recompute activations in the backward pass instead of "
        "keeping them: none, block, stage, sqrt or every:K; BatchNorm-safe (default: none; block under "
        "--low-memory).", flag="activation_checkpointing", aliases=("checkpointing",), metavar="POLICY"
    )
    checkpoint_impl: Literal["native", "fairscale"] = _f(
        "native", "Activation checkpointing implementation: torch.utils.checkpoint with a BatchNorm fix, or "
        "fairscale's checkpoint_wrapper (pip install 'resnet-scale[fairscale]')."
    )
    micro_batch_size: Optional[int] = _f(
        None, "Images per forward/backward on each device; the per-device batch is accumulated over "
        "micro-batches (default: the whole per-device batch; <= 64 under --low-memory)."
    )
    grad_accum_steps: Optional[int] = _f(
        None, "Gradient accumulation: micro-batches per optimizer step on each device, so the micro-batch is "
        "the per-device batch / N (it must divide it); instead of --micro-batch-size."
    )
    offload_activations: bool = _f(
        False, "Keep saved activations in pinned CPU memory (torch.autograd.graph.save_on_cpu)."
    )
    activation_compression: Optional[Literal["none", "int8", "int4", "int2"]] = _f(
        None, "Store activations saved for backward in 8/4/2 bits (unbiased rounding, exact ReLU masks) "
        "(default: none; --max-memory may choose it).")
    compile: bool = _f(False, "torch.compile the model (after checkpointing, before the accelerator) with one static "
                              "batch shape: each epoch leaves out its partial last batch; evaluation runs eagerly.")
    oom_recovery: bool = _f(
        False, "When a step runs out of GPU memory on any rank, every rank redoes it with half the "
        "micro-batch and twice the accumulation (same global batch). With several processes the gradient "
        "all-reduce then waits for backward instead of overlapping it."
    )
    low_memory: bool = _f(
        False, "One switch for a single small GPU: bf16 + channels_last + block checkpointing + a "
        "micro-batch that divides the per-device batch; flags given explicitly win."
    )

    max_memory: Optional[str] = _f(
        None, "Memory budget per device, e.g. 8GiB (2^30 B), 8GB (10^9 B), 512MiB, or auto (the GPU's free "
        "memory): plan precision, channels_last, checkpointing, micro-batch and activation compression to fit "
        "it before training (resnet-scale plan shows the plan); the plan overrides those flags given as "
        "defaults.", metavar="SIZE"
    )


@dataclass
class DistributedConfig:
    """How the processes share the work (``resnet_scale.distributed``). Launch with
    ``accelerate launch`` or ``torchrun``; ``--batch-size`` stays the global batch."""

    distributed: Literal["auto", "ddp", "deepspeed"] = _f(
        "auto", "Engine: DDP, or DeepSpeed ZeRO; 'auto' = deepspeed when --zero-stage >= 1, --offload or "
        "--ds-config is given, else DDP."
    )
    zero_stage: Optional[int] = _f(
        None, "DeepSpeed ZeRO stage 0-3 (1 shards optimizer states, 2 also gradients, 3 also parameters) "
        "(default: the --ds-config file's stage).", metavar="STAGE"
    )
    offload: Optional[Literal["none", "optimizer", "optimizer+params"]] = _f(
        None, "ZeRO offload to CPU memory: optimizer states (stage >= 1), and parameters (stage 3) "
        "(default: the --ds-config file's, else none)."
    )
    ds_config: Optional[str] = _f(
        None, "DeepSpeed JSON config; its \"auto\" values are filled from these flags, a value that "
        "contradicts a flag is an error (templates in ds_configs/).", metavar="FILE"
    )
    sync_bn: bool = _f(False, "Synchronise BatchNorm statistics over all processes (for small per-device batches). "
                              "On CUDA, torch's SyncBatchNorm waits for the GPU once per BatchNorm layer in every "
                              "forward pass (a host sync reading the gathered counts).")
    record_samples: bool = _f(
        False, "Write samples.json: the dataset indices each process trained on, per epoch (audits sharding)."
    )


@dataclass
class TrainConfig:
    """How long, on what, and where the run's files go."""

    epochs: int = _f(10, "Training epochs (ignored when --max-steps is given).")
    max_steps: Optional[int] = _f(None, "Stop after this many optimizer steps instead of --epochs.")
    batch_size: int = _f(128, "Global batch size: images per optimizer step over all processes.")
    seed: int = _f(0, "Seed for weights, data order and augmentation.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Training device; 'auto' uses the GPU when there is one.")
    output_dir: str = _f("runs", "Folder that holds one sub-folder per run.", metavar="PATH")
    run_name: Optional[str] = _f(None, "Name of this run's folder (default: made from model, data and time).",
                                 metavar="NAME")
    tracker: str = _f(
        "auto", "Where metrics go besides the run folder, one or several comma-separated: wandb (Weights & "
        "Biases; offline by itself without an API key or network, wandb sync uploads later), tensorboard "
        "(<run>/tensorboard), e.g. wandb,tensorboard; or none; 'auto' = wandb when it is installed "
        "(pip install 'resnet-scale[wandb]'), else none.", metavar="KIND[,KIND]", comma_list=True
    )
    wandb_project: str = _f("resnet-scale", "W&B project of the run.", metavar="NAME")
    wandb_entity: Optional[str] = _f(None, "W&B entity, a user or team (default: the one of the API key).",
                                     metavar="NAME")
    run_group: Optional[str] = _f(None, "Group of related runs (the W&B group), e.g. one comparison.", metavar="NAME")
    tags: Optional[tuple[str, ...]] = _f(None, "Comma-separated W&B tags, e.g. r18,plain.", metavar="TAG,TAG,...")
    target_accuracy: Optional[float] = _f(
        None, "Test accuracy (0-1); the summary records time_to_target_s, the seconds until an evaluation "
        "first reaches it.", metavar="FRACTION"
    )
    checkpoint_every: Optional[int] = _f(
        None, "Save a checkpoint (model, optimizer, schedule, RNG, data position) every N optimizer steps "
        "and at each epoch end; SIGTERM/SIGUSR1 always save one before stopping."
    )
    checkpoint_every_minutes: Optional[float] = _f(
        None, "Also save a checkpoint when this many minutes have passed since the last one (the main "
        "process's clock decides, so every rank saves at the same step).", metavar="MINUTES"
    )
    keep_checkpoints: int = _f(2, "Keep the newest K complete checkpoints of the run.", metavar="K")
    max_bad_steps: int = _f(
        3, "Stop the run (exit 4) after this many optimizer steps in a row with a non-finite loss or "
        "gradient; each one's update is skipped, and a non-finite model is never saved."
    )
    requeue: bool = _f(False, "Under SLURM: after the checkpoint on SIGTERM/SIGUSR1, put the job back in the "
                              "queue (scontrol requeue $SLURM_JOB_ID); pair it with --resume auto.")
    resume: Optional[str] = _f(
        None, "Continue a run with its own config.json: 'auto' = the newest complete checkpoint of --run-name "
        "(none yet: the run starts over in its folder; a finished run: nothing to do), or a checkpoint folder "
        "<run>/checkpoints/step-N. A flag that changes what the run trains needs --override.", metavar="{auto,PATH}"
    )
    log_every: int = _f(10, "Write a train metrics line every N optimizer steps.")
    eval_every: int = _f(1, "Evaluate on the test split every N epochs (and always at the end).")
    deterministic: bool = _f(False, "Use deterministic algorithms (slower; for exact reproducibility).")


@dataclass
class Config:
    """The whole run. Sections map to argument groups of ``resnet-scale train --help``; each field
    is one flag (``cfg.train.batch_size`` is ``--batch-size``).

    In Python: ``cfg = Config()`` then set fields (``cfg.model.depth = 50``), or
    ``Config.from_dict({"model": {"depth": 50}, "train": {"epochs": 1}})``; ``cfg.validate()``
    refuses settings that cannot work (``train(cfg)`` validates too)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # -- derived settings ------------------------------------------------------------------
    def image_size(self) -> int:
        """The image side actually trained on."""
        if self.data.image_size is not None:
            return self.data.image_size
        size = NATIVE_IMAGE_SIZE[self.data.source]
        if size is None:
            raise ConfigError(f"--data {self.data.source} has no native image size; give --image-size N.")
        return size

    def stem(self) -> str:
        """'cifar' or 'imagenet' after resolving 'auto' (cifar for images <= 64 px)."""
        if self.model.stem != "auto":
            return self.model.stem
        return "cifar" if self.image_size() <= 64 else "imagenet"

    def layers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(blocks per stage, stage widths), validated against the block."""
        from resnet_scale.models import resolve_layers

        try:
            return resolve_layers(self.model.block, self.model.depth, self.model.layers)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def trackers(self) -> tuple[str, ...]:
        """The trackers after resolving 'auto' (wandb when installed); () for none."""
        kinds = split_trackers(self.train.tracker)
        if kinds != ("auto",):
            return kinds
        import importlib.util

        return ("wandb",) if importlib.util.find_spec("wandb") is not None else ()

    def tracker(self) -> str:
        """The trackers after resolving 'auto', comma-separated ('none' for none)."""
        return ",".join(self.trackers()) or "none"

    def engine(self) -> str:
        """'ddp' or 'deepspeed' after resolving --distributed auto."""
        d = self.distributed
        if d.distributed != "auto":
            return d.distributed
        return "deepspeed" if (d.zero_stage or d.offload not in (None, "none") or d.ds_config) else "ddp"

    def validate(self) -> "Config":
        """Refuse settings that cannot work, with the numbers and what to change."""
        from resnet_scale.config.checks import check_config

        check_config(self)
        return self

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return json.loads(json.dumps(out))  # tuples -> lists, plain JSON types only

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base: "Config | None" = None) -> "Config":
        """Overlay a nested dict (the ``config`` part of a run's config.json) on ``base`` (default:
        the defaults).

        Every top-level key must be a section and every key of a section one of its fields: an
        unknown section, a field written at the top level (a flat layout) or in the wrong section
        is an error that says where it belongs.
        """
        cfg = copy.deepcopy(base) if base is not None else cls()
        sections = [s.name for s in dataclasses.fields(cls)]
        owner = {f.name: s for s in sections for f in dataclasses.fields(getattr(cfg, s))}
        for section, values in raw.items():
            if section not in sections:
                raise ConfigError(_misplaced(section, None, owner, sections))
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{section}' must be a mapping of its keys, got {_shown(values)}.")
            target = getattr(cfg, section)
            names = {f.name: f for f in dataclasses.fields(target)}
            for key, value in values.items():
                if key not in names:
                    raise ConfigError(_misplaced(key, section, owner, sections))
                setattr(target, key, coerce_value(type(target), names[key], value, f"{section}.{key}"))
        return cfg


def _misplaced(key: Any, section: str | None, owner: dict[str, str], sections: list[str]) -> str:
    """The message for a key that is not where it may be: at the top level (``section`` None) only
    sections may stand; in a section only its own fields."""
    field = str(key).replace("-", "_")
    home = owner.get(field)
    if section is None:
        if home is not None:
            return (f"config key '{key}' stands at the top level; every key belongs under its section "
                    f"('{home}:' then '  {field}: ...'); the top level holds only {', '.join(sections)}.")
        return f"unknown config section '{key}'; the sections are {', '.join(sections)}."
    if home is not None and home != section:
        return f"config key '{section}.{key}' belongs to section '{home}': write it as '{home}.{field}'."
    valid = [name for name, where in owner.items() if where == section]
    return f"unknown config key '{section}.{key}'; valid keys of '{section}': {', '.join(valid)}."
