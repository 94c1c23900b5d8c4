"""Setting a run up: config checks, memory plan, accelerator, data, model, optimizer, run folder,
tracker, and the loop state (fresh, or read from the checkpoint a resumed run continues; a resume
trains with the run's own config.json: ``resume.py``).

Data flows one way: config -> data -> model -> accelerator -> loop -> run files. Every check that
can refuse the run comes before anything is written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from resnet_scale.config import Config, ConfigError, default_run_name
from resnet_scale.data import (
    DeviceLoader,
    ImageSet,
    StreamingLoader,
    build_datasets,
    estimate_imagefolder_bytes,
    index_imagefolder,
)
from resnet_scale.distributed.accelerator import build_accelerator, prepare, resolve_device, world_size_from_env
from resnet_scale.distributed.sync_bn import apply_sync_batchnorm
from resnet_scale.memory.settings import MemorySettings, activation_offload, apply_memory_transforms, resolve_memory
from resnet_scale.models import build_resnet, count_parameters, count_weighted_layers, describe
from resnet_scale.planner import plan_for_training
from resnet_scale.tracking import build_tracker, check_tracker
from resnet_scale.tracking.environment import environment_info
from resnet_scale.train.agree import agreed
from resnet_scale.train.checkpoint import elastic_train_config, load_checkpoint
from resnet_scale.train.optim import build_optimizer, build_scheduler
from resnet_scale.train.progress import Progress
from resnet_scale.train.resume import (
    Resume,
    check_loop_state,
    hyperparameters,
    open_resume,
    restore_hyperparameters,
)
from resnet_scale.train.run_dir import RunDir, check_output_dir
from resnet_scale.train.state import LoopState

logger = logging.getLogger("resnet_scale")


@dataclass
class Run:
    """What the loop works with, built once by :func:`set_up`."""

    cfg: Config  # as planned, with torchrun's elastic settings applied
    accelerator: Accelerator
    memory: MemorySettings  # the plan in use (--oom-recovery may switch to a smaller one)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    offload: Any  # the activation-offload context of the forward pass, or None
    train_loader: Any
    test_loader: Any
    steps_per_epoch: int
    total_steps: int
    epochs: int
    folder: RunDir
    tracker: Any
    progress: Progress
    state: LoopState  # fresh, or the resumed checkpoint's
    num_parameters: int
    weighted_layers: int


def build_data(cfg: Config):
    """(train, test): ImageSets held in memory, or ImageFolderIndexes to stream for an image
    folder too big to hold (--in-memory)."""
    d = cfg.data
    if d.source == "imagefolder" and d.in_memory != "yes":
        size = cfg.image_size()
        limit = d.in_memory_limit_gib * 2**30
        if d.in_memory == "no" or estimate_imagefolder_bytes(d.data_dir, size) > limit:
            return index_imagefolder(d.data_dir, size)
    return build_datasets(
        d.source,
        data_dir=d.data_dir,
        image_size=d.image_size,
        download=d.download,
        seed=cfg.train.seed,
        synthetic_samples=(d.synthetic_train_samples, d.synthetic_test_samples),
        num_classes=d.synthetic_classes,
    )


def make_loader(data, cfg: Config, **kwargs):
    """The device-resident loader, or the streaming one for an indexed image folder; both shard
    and augment identically."""
    if isinstance(data, ImageSet):
        return DeviceLoader(data, **kwargs)
    return StreamingLoader(data, num_workers=cfg.data.num_workers, **kwargs)


def _set_determinism(cfg: Config) -> None:
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels


def _check(cfg: Config) -> tuple[tuple[str, ...], str]:
    """The checks that need no data: returns (the trackers, the device type)."""
    cfg.validate()
    if cfg.train.resume in (None, "auto"):
        check_output_dir(cfg.train.output_dir)  # an unwritable --output-dir: refused before any data loads
    tracker_kind = cfg.trackers()
    check_tracker(tracker_kind)  # a missing package stops every rank before any data loads
    device_type = resolve_device(cfg.train.device)
    if cfg.memory.max_memory == "auto" and world_size_from_env() > 1:
        raise ConfigError(
            "--max-memory auto reads each GPU's free memory, which can differ between processes and give "
            "them different plans; with several processes give a size, e.g. --max-memory 70GiB."
        )
    return tracker_kind, device_type


def _open_folder(cfg: Config, accelerator: Accelerator, saved: dict[str, Any], resume: Resume, *, optimizer,
                 scheduler, steps_per_epoch: int, total_steps: int) -> tuple[RunDir, LoopState]:
    """The run folder (new, or the resumed run's) and the loop state to start from. A resume first
    validates the checkpoint's loop state against this run and its files, then loads the checkpoint;
    only then does the main process cut metrics.jsonl or write config.json."""
    t = cfg.train
    main = accelerator.is_main_process
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if resume.path is not None:
        folder = RunDir(resume.path.parent, resume.path.name)
    else:
        name = [t.run_name or default_run_name(cfg)]
        if accelerator.num_processes > 1:  # generated names hold the time: every rank must use the main process's
            broadcast_object_list(name)
        folder = RunDir(t.output_dir, name[0])
    checkpoint = resume.checkpoint
    if restarted and main:
        logger.info(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: "
                    + (f"resuming from {checkpoint}" if checkpoint else "no checkpoint yet, starting the run over"))
    state = LoopState()
    if checkpoint:
        state = check_loop_state(checkpoint, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                 metrics_path=folder.metrics_path)
        built = hyperparameters(optimizer)
        load_checkpoint(accelerator, checkpoint)
        restore_hyperparameters(optimizer, scheduler, built)  # this config's lr, momentum, ... (--override)
    with agreed(accelerator):  # e.g. the folder already holds a run: only the main process sees it, all stop
        if main:
            if checkpoint or resume.start_over:
                aside = folder.set_aside_later_best(state.step)
                if aside is not None:
                    logger.info(f"model_best.safetensors was saved after step {state.step}, where this run "
                                f"continues: kept as {aside.name}; a new one is written at the run's next best")
            if checkpoint:
                folder.reopen(metrics_lines=state.metrics_lines)
                if resume.changes:
                    extra = {k: v for k, v in resume.saved.items() if k != "config"}
                    extra.update({k: saved[k] for k in ("world_size", "memory", "memory_plan")})
                    folder.write_config(resume.recorded_config(cfg), {**extra, "overrides": resume.record(state.step)})
            elif resume.start_over:  # killed before its first checkpoint: the same run, from step 0
                logger.info(f"run {folder.path} has no checkpoint yet: starting it over in the same folder")
                folder.reopen(metrics_lines=0)
                folder.write_config(cfg, {**saved, "overrides": resume.record(0)} if resume.changes else saved)
            else:
                folder.create()
                folder.write_config(cfg, saved)
    return folder, state


def set_up(cfg: Config, *, given: frozenset[str] | None = None, overrides: frozenset[str] = frozenset()) -> Run:
    """Check, plan and build everything in the order the checks need; resume if asked. A resume trains
    with the run's config.json: ``given`` names the settings the command asked for (None: all of
    ``cfg``), ``overrides`` those that may differ from the run's (--override). Raises RunFinished for
    --resume auto of a finished run, before anything is built."""
    cfg = dataclasses.replace(cfg, train=elastic_train_config(cfg))
    resume = open_resume(cfg, given, overrides)
    cfg = resume.cfg
    tracker_kind, device_type = _check(cfg)
    cfg, memory_plan = plan_for_training(cfg, world_size=world_size_from_env(), device_type=device_type)
    memory = resolve_memory(cfg, world_size=world_size_from_env(), device_type=device_type)
    resume.check(cfg, precision=memory.precision, world_size=world_size_from_env())
    accelerator = build_accelerator(cfg, memory)
    main = accelerator.is_main_process
    logger.setLevel(logging.INFO if main else logging.WARNING)
    set_seed(cfg.train.seed)
    _set_determinism(cfg)

    with agreed(accelerator):  # a file one process cannot read stops every process
        train_set, test_set = build_data(cfg)
    if cfg.train.batch_size > len(train_set):
        raise ConfigError(f"--batch-size {cfg.train.batch_size} is larger than the training split ({len(train_set):,} "
                          f"{cfg.data.source} images); use --batch-size {len(train_set)} or less, or more data.")
    layers, _ = cfg.layers()
    model = build_resnet(cfg.model.block, cfg.model.depth, stem=cfg.stem(), num_classes=len(train_set.classes),
                         layers=cfg.model.layers, zero_init_residual=cfg.model.zero_init_residual)
    num_parameters = count_parameters(model)
    resume.check_model(num_parameters)
    weighted_layers = count_weighted_layers(cfg.model.block, layers)

    world = accelerator.num_processes
    crop, flip = cfg.data.resolved_augment()
    image_size = cfg.image_size()
    padding = cfg.data.crop_padding if cfg.data.crop_padding is not None else image_size // 8
    loader_args = dict(device=accelerator.device, rank=accelerator.process_index, world_size=world,
                       seed=cfg.train.seed, channels_last=memory.channels_last)
    # --compile: full batches only (one static shape); the epoch's last partial batch is left out.
    train_loader = make_loader(train_set, cfg, batch_size=cfg.train.batch_size, train=True,
                           crop_padding=padding if crop else 0, flip=flip, drop_last=memory.compile, **loader_args)
    test_loader = make_loader(test_set, cfg, batch_size=cfg.train.batch_size, train=False, **loader_args)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    if cfg.distributed.sync_bn and world > 1:  # new BatchNorm modules: before the optimizer sees them
        model = apply_sync_batchnorm(model, accelerator.device.type)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    model_memory = memory
    if cfg.engine() == "deepspeed" and memory.channels_last:
        # ZeRO keeps parameters as views of flat buffers; converting the weights to channels_last would
        # cut them off from those buffers. The loader's NHWC inputs keep every activation NHWC instead.
        model_memory = dataclasses.replace(memory, channels_last=False)
        logger.info("channels_last under ZeRO: NHWC inputs and activations, weights stay NCHW")
    model = apply_memory_transforms(model, model_memory)  # in place: the optimizer's tensors stay the same
    model, optimizer = prepare(accelerator, model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # save_state/load_state carry the schedule too
    offload = activation_offload(memory, accelerator.device)

    t = cfg.train
    saved = {"environment": environment_info(), "world_size": world, "memory": memory.as_dict(),
             "memory_plan": memory_plan.as_dict() if memory_plan else None,
             "num_parameters": num_parameters, "weighted_layers": weighted_layers,
             "classes": list(train_set.classes)}  # what the model's outputs mean (resnet-scale eval checks them)
    folder, state = _open_folder(cfg, accelerator, saved, resume, optimizer=optimizer, scheduler=scheduler,
                                 steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    if main and t.tracker == "auto" and not tracker_kind:
        logger.info("tracking: W&B is not installed, metrics go to the run folder only "
                    "(pip install 'resnet-scale[wandb]')")
    with agreed(accelerator):  # the tracker starts on the main process only
        tracker = build_tracker(tracker_kind, is_main=main, run_dir=folder.path,
                                config={"config": cfg.to_dict(), **saved}, project=t.wandb_project,
                                entity=t.wandb_entity, group=t.run_group, tags=list(t.tags or []),
                                run_name=folder.path.name, resume_id=state.tracker_run_id)

    progress = Progress(total_steps, enabled=main)
    progress.message(
        f"resnet-scale: {describe(cfg.model.block, layers, model)}, {cfg.stem()} stem | "
        f"{cfg.data.source} {len(train_set)} train / {len(test_set)} test at {image_size}px | "
        f"{world} process(es) on {accelerator.device} | {epochs} epoch(s), {total_steps} steps | run {folder.path}"
    )
    progress.message(f"memory: {memory.describe()}")
    if memory.compile and train_loader.num_left_out():
        progress.message(
            f"--compile: one static batch shape; each epoch leaves out {train_loader.num_left_out()} of the "
            f"{len(train_set)} training images (its partial last batch; different images every epoch, as the "
            f"order is reshuffled), {steps_per_epoch} steps per epoch"
        )
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    return Run(cfg=cfg, accelerator=accelerator, memory=memory, model=model, optimizer=optimizer,
               scheduler=scheduler, offload=offload, train_loader=train_loader, test_loader=test_loader,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, epochs=epochs, folder=folder,
               tracker=tracker, progress=progress, state=state, num_parameters=num_parameters,
               weighted_layers=weighted_layers)
