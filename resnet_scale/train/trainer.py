"""The training loop. It touches the framework at a few named seams only: ``prepare``,
``backward``, ``reduce`` (metrics over ranks) and ``wait_for_everyone`` (DESIGN.md rule 5).

Data flows one way: config -> data -> model -> accelerator -> loop -> run files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from resnet_scale.config import Config, ConfigError, default_run_name
from resnet_scale.data import (
    DeviceLoader,
    ImageSet,
    StreamingLoader,
    build_datasets,
    estimate_imagefolder_bytes,
    index_imagefolder,
)
from resnet_scale.distributed.accelerator import build_accelerator, resolve_device, world_size_from_env
from resnet_scale.distributed.sync_bn import apply_sync_batchnorm
from resnet_scale.planner import plan_for_training
from resnet_scale.memory.settings import activation_offload, apply_memory_transforms, resolve_memory
from resnet_scale.models import build_resnet, count_parameters, count_weighted_layers, describe
from resnet_scale.train.optim import build_optimizer, build_scheduler
from resnet_scale.tracking import build_tracker, check_tracker
from resnet_scale.train.checkpoint import (
    Preempted,
    elastic_train_config,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from resnet_scale.train.control import LoopControl, NonFiniteError, check_finite_weights, requeue_slurm_job
from resnet_scale.train.metrics import Window, broadcast_buffers, evaluate, reduce_sums
from resnet_scale.train.oom import OutOfMemoryUnrecoverable, guarded_step, next_plan
from resnet_scale.train.progress import Progress
from resnet_scale.train.step import BufferSnapshot, train_step
from resnet_scale.train.run_dir import RunDir, check_output_dir
from resnet_scale.tracking.environment import environment_info


def _build_data(cfg: Config):
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


def _loader(data, cfg: Config, **kwargs):
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


def _step_with_recovery(accelerator, model, optimizer, images, labels, step, memory, cfg, offload, snapshot,
                        events, progress):
    """``guarded_step`` until it fits: each out-of-memory error (on any rank) halves the
    micro-batch on every rank. Returns (result, the plan now in use)."""
    while True:
        result = guarded_step(accelerator, model, optimizer, images, labels, step=step, memory=memory,
                              label_smoothing=cfg.optim.label_smoothing, offload=offload,
                              max_grad_norm=cfg.optim.max_grad_norm, buffers=snapshot)
        if result is not None:
            return result, memory
        smaller = next_plan(memory)
        if smaller is None:
            raise OutOfMemoryUnrecoverable(
                f"step {step} runs out of memory even with a micro-batch of {memory.micro_batch_size} image(s); "
                "lower --batch-size, add --checkpointing block / --precision bf16, or use more devices.")
        memory = smaller
        accelerator.gradient_accumulation_steps = memory.accumulation_steps
        events.append({"step": step, "micro_batch_size": memory.micro_batch_size,
                       "accumulation_steps": memory.accumulation_steps})
        progress.message(f"step {step}: out of memory on a rank; every rank redoes it with {memory.describe()}")


def train(cfg: Config) -> dict[str, Any]:
    """Train as configured; returns the summary also written to ``summary.json``."""
    cfg.validate()
    if cfg.train.resume in (None, "auto"):
        check_output_dir(cfg.train.output_dir)  # an unwritable --output-dir: refused before any data loads
    tracker_kind = cfg.tracker()
    check_tracker(tracker_kind)  # a missing package stops every rank before any data loads
    device_type = resolve_device(cfg.train.device)
    if cfg.memory.max_memory == "auto" and world_size_from_env() > 1:
        raise ConfigError(
            "--max-memory auto reads each GPU's free memory, which can differ between processes and give "
            "them different plans; with several processes give a size, e.g. --max-memory 70GiB."
        )
    cfg, memory_plan = plan_for_training(cfg, world_size=world_size_from_env(), device_type=device_type)
    memory = resolve_memory(cfg, world_size=world_size_from_env(), device_type=device_type)
    accelerator = build_accelerator(cfg, memory)
    main = accelerator.is_main_process
    logging.getLogger("resnet_scale").setLevel(logging.INFO if main else logging.WARNING)
    set_seed(cfg.train.seed)
    _set_determinism(cfg)

    train_set, test_set = _build_data(cfg)
    layers, _ = cfg.layers()
    model = build_resnet(
        cfg.model.block,
        cfg.model.depth,
        stem=cfg.stem(),
        num_classes=len(train_set.classes),
        layers=cfg.model.layers,
        zero_init_residual=cfg.model.zero_init_residual,
    )
    num_parameters = count_parameters(model)
    weighted_layers = count_weighted_layers(cfg.model.block, layers)

    world = accelerator.num_processes
    crop, flip = cfg.data.resolved_augment()
    image_size = cfg.image_size()
    padding = cfg.data.crop_padding if cfg.data.crop_padding is not None else image_size // 8
    loader_args = dict(device=accelerator.device, rank=accelerator.process_index, world_size=world,
                       seed=cfg.train.seed, channels_last=memory.channels_last)
    train_loader = _loader(
        train_set, cfg, batch_size=cfg.train.batch_size, train=True,
        crop_padding=padding if crop else 0, flip=flip, **loader_args,
    )
    test_loader = _loader(test_set, cfg, batch_size=cfg.train.batch_size, train=False, **loader_args)

    steps_per_epoch = len(train_loader)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    if cfg.distributed.sync_bn and world > 1:  # new BatchNorm modules: before the optimizer sees them
        model = apply_sync_batchnorm(model, accelerator.device.type)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    model_memory = memory
    if cfg.engine() == "deepspeed" and memory.channels_last:
        # ZeRO keeps parameters as views of flat buffers; converting the weights would cut them
        # off (FIELD_NOTES.md). The loader's NHWC inputs keep every activation NHWC instead.
        model_memory = dataclasses.replace(memory, channels_last=False)
        logging.getLogger("resnet_scale").info("channels_last under ZeRO: NHWC inputs and activations, weights stay NCHW")
    model = apply_memory_transforms(model, model_memory)  # in place: the optimizer's tensors stay the same
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # save_state/load_state carry the schedule too
    offload = activation_offload(memory, accelerator.device)

    cfg = dataclasses.replace(cfg, train=elastic_train_config(cfg))
    t = cfg.train
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume_from = Path(t.resume) if t.resume not in (None, "auto") else None
    if resume_from is not None:  # <output>/<run>/checkpoints/step-N
        run = RunDir(resume_from.resolve().parents[2], resume_from.resolve().parents[1].name)
    else:
        name = [t.run_name or default_run_name(cfg)]
        if world > 1:  # generated names hold the time: every rank must use the main process's
            broadcast_object_list(name)
        run = RunDir(t.output_dir, name[0])
    resume_from = resolve_resume(t.resume, run.path)
    if restarted and main:
        logging.getLogger("resnet_scale").info(
            f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: "
            + (f"resuming from {resume_from}" if resume_from else "no checkpoint yet, starting the run over"))
    saved = {"environment": environment_info(), "world_size": world, "memory": memory.as_dict(),
             "memory_plan": memory_plan.as_dict() if memory_plan else None,
             "num_parameters": num_parameters, "weighted_layers": weighted_layers}
    loop = load_checkpoint(accelerator, resume_from) if resume_from else {}
    if main:
        if resume_from:
            run.reopen(metrics_lines=loop["metrics_lines"])
        elif restarted and (run.path / "config.json").is_file():  # the same run, restarted before a checkpoint
            run.reopen(metrics_lines=0)
            run.write_config(cfg, saved)
        else:
            run.create()
            run.write_config(cfg, saved)
    accelerator.wait_for_everyone()
    if main and t.tracker == "auto" and tracker_kind == "none":
        logging.getLogger("resnet_scale").info(
            "tracking: W&B is not installed, metrics go to the run folder only (pip install 'resnet-scale[wandb]')")
    tracker = build_tracker(tracker_kind, is_main=main, run_dir=run.path, config={"config": cfg.to_dict(), **saved},
                            project=t.wandb_project, entity=t.wandb_entity, group=t.run_group,
                            tags=list(t.tags or []), run_name=run.path.name,
                            resume_id=loop.get("tracker_run_id"))

    progress = Progress(total_steps, enabled=main)
    progress.message(
        f"resnet-scale: {describe(cfg.model.block, layers, model)}, {cfg.stem()} stem | "
        f"{cfg.data.source} {len(train_set)} train / {len(test_set)} test at {image_size}px | "
        f"{world} process(es) on {accelerator.device} | {epochs} epoch(s), {total_steps} steps | run {run.path}"
    )
    progress.message(f"memory: {memory.describe()}")
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)

    step, best, last_eval, skipped = loop.get("step", 0), loop.get("best", 0.0), loop.get("last_eval"), loop.get("skipped", 0)
    time_to_target, last_logged_step = loop.get("time_to_target"), loop.get("last_logged_step", 0)
    last_grad_norm = loop.get("last_grad_norm")
    oom_events: list[dict[str, int]] = []  # plan switches after out-of-memory errors (--oom-recovery)
    seen_samples: dict[int, list[int]] = {}  # epoch -> dataset indices this process trained on
    train_time, train_images = loop.get("train_time", 0.0), loop.get("train_images", 0)
    started = time.perf_counter() - loop.get("elapsed", 0.0)
    start_epoch, done_in_epoch = loop.get("epoch", 0), loop.get("epoch_step", 0)
    control = LoopControl(accelerator, every_steps=t.checkpoint_every, every_minutes=t.checkpoint_every_minutes,
                          max_bad_steps=t.max_bad_steps, deepspeed=cfg.engine() == "deepspeed",
                          bad_steps=loop.get("bad_steps", 0))
    sync_buffers = cfg.engine() == "deepspeed" and world > 1
    # A withheld update also puts BatchNorm's statistics back (DeepSpeed updates inside backward).
    snapshot = BufferSnapshot(model) if cfg.engine() != "deepspeed" else None

    def checkpoint(resume_epoch: int, resume_epoch_step: int, window_state: dict[str, float]) -> Path:
        """Save everything a resumed run needs to continue at batch ``resume_epoch_step`` of
        ``resume_epoch`` with identical metrics (one place for mid-epoch and epoch-end saves)."""
        state = dict(step=step, epoch=resume_epoch, epoch_step=resume_epoch_step, best=best, last_eval=last_eval,
                     skipped=skipped, time_to_target=time_to_target, last_logged_step=last_logged_step,
                     last_grad_norm=None if last_grad_norm is None else float(last_grad_norm),
                     train_time=train_time, train_images=train_images, elapsed=time.perf_counter() - started,
                     window=window_state, metrics_lines=run.lines_written, bad_steps=control.bad_steps,
                     tracker_run_id=tracker.run_id)
        if sync_buffers:  # the saved statistics are rank 0's: every rank resumes with the same ones
            broadcast_buffers(model, accelerator)
        check_finite_weights(model, accelerator, f"the checkpoint of step {step}")
        saved_at = save_checkpoint(accelerator, run.path, step, state, t.keep_checkpoints)
        control.saved()
        return saved_at

    model.train()
    for epoch in range(start_epoch, epochs):
        train_loader.set_epoch(epoch)
        if cfg.distributed.record_samples:
            epoch_batches = train_loader.epoch_indices()
        epoch_start = time.perf_counter()
        window = Window.new(accelerator.device)
        skip = done_in_epoch if epoch == start_epoch else 0
        if skip:  # resumed mid-epoch: the window of the interrupted log interval comes back too
            window.restore(loop["window"])
        for epoch_step, (images, labels) in enumerate(train_loader, start=1):
            if epoch_step <= skip:  # the loader is deterministic per (seed, epoch): skip what was trained
                continue
            if cfg.memory.oom_recovery:
                result, memory = _step_with_recovery(accelerator, model, optimizer, images, labels, step + 1,
                                                     memory, cfg, offload, snapshot, oom_events, progress)
            else:
                result = train_step(accelerator, model, optimizer, images, labels,
                                    accumulation_steps=memory.accumulation_steps,
                                    label_smoothing=cfg.optim.label_smoothing, offload=offload,
                                    max_grad_norm=cfg.optim.max_grad_norm, buffers=snapshot)
            step += 1
            try:
                decision = control.after_step(step, result)
            except NonFiniteError:  # too many bad steps: close what is open; nothing non-finite is saved
                progress.close(), tracker.finish(), run.close(), control.close()
                raise
            if result.stepped:
                scheduler.step()  # counts optimizer steps (not passed through prepare: see optim.py)
            else:
                skipped += 1  # fp16 loss scaling or a non-finite gradient: the update was withheld
            if not decision.bad:  # a non-finite loss would poison the window's averages
                window.add(result)
                last_grad_norm = result.grad_norm if result.grad_norm is not None else last_grad_norm
            if cfg.distributed.record_samples:
                seen_samples.setdefault(epoch, []).extend(epoch_batches[epoch_step - 1].tolist())
            at_end = step == total_steps or epoch_step == steps_per_epoch
            if step % cfg.train.log_every == 0 or at_end:
                loss_sum, correct, count = reduce_sums(accelerator, window.loss_sum, window.correct, window.count)
                if count:  # else every step since the last line was non-finite: nothing to average
                    elapsed = time.perf_counter() - window.started
                    train_time += elapsed
                    train_images += int(count)
                    record = {
                        "step": step, "epoch": epoch + epoch_step / steps_per_epoch, "split": "train",
                        "loss": loss_sum / count, "accuracy": correct / count,
                        "lr": optimizer.param_groups[0]["lr"], "images_per_s": count / elapsed,
                        "step_time_s": elapsed / (step - last_logged_step), "time_s": time.perf_counter() - started,
                        "grad_norm": float(last_grad_norm) if last_grad_norm is not None else None,
                    }
                    last_logged_step = step
                    if main:
                        run.log(record)
                    tracker.log(record, step=step)  # a no-op off the main process
                    progress.update(step, epoch + 1, {"loss": record["loss"], "acc": record["accuracy"],
                                                      "img/s": record["images_per_s"]}, log_line=True)
                window = Window.new(accelerator.device)
            else:
                progress.update(step, epoch + 1, {}, log_line=False)
            if decision.save:
                saved_at = checkpoint(epoch, epoch_step, window.snapshot())
                if decision.stop:
                    progress.close()
                    tracker.finish()
                    run.close()
                    control.close()
                    if t.requeue and main:
                        progress.message(requeue_slurm_job())
                    raise Preempted(saved_at)
            if step == total_steps:
                break

        is_last = step == total_steps
        if (epoch + 1) % cfg.train.eval_every == 0 or is_last:
            if sync_buffers:
                broadcast_buffers(model, accelerator)
            last_eval = evaluate(model, test_loader, accelerator)
            best = max(best, last_eval["accuracy"])
            record = {"step": step, "epoch": epoch + 1, "split": "test", "loss": last_eval["loss"],
                      "accuracy": last_eval["accuracy"], "lr": optimizer.param_groups[0]["lr"],
                      "images_per_s": None, "samples": last_eval["samples"],
                      "epoch_time_s": time.perf_counter() - epoch_start, "time_s": time.perf_counter() - started,
                      "peak_memory_bytes": (torch.cuda.max_memory_allocated(accelerator.device)
                                            if accelerator.device.type == "cuda" else None)}
            if t.target_accuracy is not None and time_to_target is None and last_eval["accuracy"] >= t.target_accuracy:
                time_to_target = record["time_s"]
            if main:
                run.log(record)
            tracker.log(record, step=step)
            progress.message(
                f"epoch {epoch + 1}/{epochs}: test loss {last_eval['loss']:.4f} "
                f"accuracy {last_eval['accuracy']:.2%} (best {best:.2%}) in {record['epoch_time_s']:.1f}s"
            )
        if (t.checkpoint_every or t.checkpoint_every_minutes) and not is_last:
            checkpoint(epoch + 1, 0, Window.new(accelerator.device).snapshot())
        if is_last:
            break
    progress.close()
    control.close()

    summary = {
        "final_accuracy": last_eval["accuracy"] if last_eval else None,
        "best_accuracy": best if last_eval else None,
        "final_test_loss": last_eval["loss"] if last_eval else None,
        "wall_time_s": time.perf_counter() - started,
        "images_per_s": train_images / train_time if train_time else None,
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(accelerator.device)
                              if accelerator.device.type == "cuda" else None),
        "num_parameters": num_parameters,
        "weighted_layers": weighted_layers,
        "steps": step,
        "skipped_steps": skipped,
        "bad_steps": control.bad_steps,
        "oom_recoveries": oom_events,
        "epochs": epochs,
        "memory": memory.as_dict(),
        "world_size": world,
        "run_dir": str(run.path),
        "target_accuracy": t.target_accuracy,
        "time_to_target_s": time_to_target,
        "tracker_run_id": tracker.run_id,
    }
    accelerator.wait_for_everyone()
    check_finite_weights(model, accelerator, "model.safetensors")
    state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3: gathers the shards
    samples = gather_object([seen_samples]) if cfg.distributed.record_samples else None
    if cfg.memory.oom_recovery:  # evidence that every rank switched plans at the same steps
        summary["oom_recoveries_per_rank"] = gather_object([oom_events])
    if main:
        run.save_weights(state_dict)
        if samples is not None:
            run.write_json("samples.json", {"world_size": world, "epochs": {
                str(e): [rank_samples.get(e, []) for rank_samples in samples] for e in range(epochs)}})
        run.write_summary(summary)
        run.close()
        tracker.summary(summary)
        tracker.finish()
        progress.message(
            f"done: final accuracy {summary['final_accuracy']:.2%}, best {summary['best_accuracy']:.2%}, "
            f"{summary['wall_time_s']:.0f}s, {summary['images_per_s']:.0f} img/s -> {run.path}"
        )
    # Every rank waits here (the GIL released) until the main process has written its files: the
    # gloo worker threads must drop the tensors of the last collectives while Python is still up.
    # Exiting straight after gather_object aborted a rank in ~1 run in 10 ("terminate called
    # without an active exception": a worker thread took the GIL during interpreter shutdown).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
