"""Finishing a run: the summary (``summary.json``), the final weights (``model.safetensors``), the
samples each process trained on (``samples.json``, --record-samples) and the tracker's last words;
and the best weights so far (``model_best.safetensors``), written during the run."""

from __future__ import annotations

from typing import Any

from accelerate.utils import gather_object

from resnet_scale.train.checkpoint import checkpoint_dirs
from resnet_scale.train.control import check_finite_weights, resume_advice
from resnet_scale.train.metrics import peak_memory_bytes
from resnet_scale.train.run_dir import BEST_WEIGHTS, FINAL_WEIGHTS
from resnet_scale.train.setup import Run
from resnet_scale.train.state import LoopState


def save_best(run: Run, state: LoopState, epoch: int) -> None:
    """``model_best.safetensors``: the weights that just reached a new best test accuracy (every rank
    calls it: gathering ZeRO-3's shards is a collective; the main process writes). The step, epoch and
    accuracy go into the file's header; a resume reads the step (``RunDir.set_aside_later_best``)."""
    state_dict = run.accelerator.get_state_dict(run.model)
    if run.accelerator.is_main_process:
        run.folder.save_weights(state_dict, BEST_WEIGHTS, metadata={
            "step": str(state.step), "epoch": str(epoch + 1), "test_accuracy": repr(state.best)})


def summarize(run: Run, state: LoopState, oom_events: list[dict[str, int]]) -> dict[str, Any]:
    """The run's summary; what the loop counted comes from ``state``."""
    last = state.last_eval
    return {
        "final_accuracy": last["accuracy"] if last else None,
        "best_accuracy": state.best if last else None,
        "final_test_loss": last["loss"] if last else None,
        "wall_time_s": state.elapsed,
        "images_per_s": state.train_images / state.train_time if state.train_time else None,
        "peak_memory_bytes": peak_memory_bytes(run.accelerator.device),
        "num_parameters": run.num_parameters,
        "weighted_layers": run.weighted_layers,
        "steps": state.step,
        "skipped_steps": state.skipped,
        "bad_steps": state.bad_steps,
        "oom_recoveries": oom_events,
        "epochs": run.epochs,
        "memory": run.memory.as_dict(),
        "world_size": run.accelerator.num_processes,
        "run_dir": str(run.folder.path),
        "target_accuracy": run.cfg.train.target_accuracy,
        "time_to_target_s": state.time_to_target,
        "tracker_run_id": state.tracker_run_id,
    }


def finish(run: Run, state: LoopState, *, oom_events: list[dict[str, int]],
           seen_samples: dict[int, list[int]]) -> dict[str, Any]:
    """Write the finished run's files (main process) after the collectives every rank joins; returns
    the summary."""
    accelerator, cfg = run.accelerator, run.cfg
    summary = summarize(run, state, oom_events)
    accelerator.wait_for_everyone()
    check_finite_weights(run.model, accelerator, f"model.safetensors (step {state.step})",
                         resume_advice(cfg, run.memory.precision, checkpoint_dirs(run.folder.path)))
    state_dict = accelerator.get_state_dict(run.model)  # a collective under ZeRO-3: gathers the shards
    samples = gather_object([seen_samples]) if cfg.distributed.record_samples else None
    if cfg.memory.oom_recovery:  # evidence that every rank switched plans at the same steps
        summary["oom_recoveries_per_rank"] = gather_object([oom_events])
    if accelerator.is_main_process:
        run.folder.save_weights(state_dict)
        if samples is not None:
            run.folder.write_json("samples.json", {"world_size": accelerator.num_processes, "epochs": {
                str(e): [rank_samples.get(e, []) for rank_samples in samples] for e in range(run.epochs)}})
        run.folder.write_summary(summary)
        run.folder.close()
        run.tracker.summary(summary)
        weights = [run.folder.path / name for name in (FINAL_WEIGHTS, BEST_WEIGHTS)]
        run.tracker.log_weights([p for p in weights if p.is_file()],  # W&B: a model artifact
                                {k: summary[k] for k in ("steps", "final_accuracy", "best_accuracy")})
        run.tracker.finish()
        run.progress.message(
            f"done: final accuracy {summary['final_accuracy']:.2%}, best {summary['best_accuracy']:.2%}, "
            f"{summary['wall_time_s']:.0f}s, {summary['images_per_s']:.0f} img/s -> {run.folder.path}"
        )
    # Every rank waits here (the GIL released) until the main process has written its files: the
    # gloo worker threads must drop the tensors of the last collectives while Python is still up.
    # Exiting straight after gather_object aborted a rank in ~1 run in 10 ("terminate called
    # without an active exception": a worker thread took the GIL during interpreter shutdown).
    # The process group, if the run started it, is ended by train() (process_state.py), which leaves
    # a group the caller started open.
    accelerator.wait_for_everyone()
    return summary
