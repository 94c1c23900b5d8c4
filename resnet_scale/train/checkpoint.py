"""Checkpoints of a run: ``<run>/checkpoints/step-NNNNNNNNN/``, written atomically.

Every process calls ``save_checkpoint`` (``accelerator.save_state`` is collective under DDP and
ZeRO). The state goes to a hidden temporary folder; only when it is complete does the main
process write ``loop_state.json`` and the ``COMPLETE`` marker and rename the folder, so a crash
mid-save never leaves a half checkpoint under a real name. The marker records the size and
sha256 of every file (``integrity.py``); ``latest_checkpoint`` only ever returns complete ones
(without reading them), and a resume takes the newest one whose files are all as saved
(``newest_intact_checkpoint``). The loop's :class:`~resnet_scale.train.state.LoopState`
(counters, clocks, the unfinished metric window) travels in ``loop_state.json``, so a resumed run
continues at the exact next batch with identical metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from resnet_scale.config import Config, ConfigError, TrainConfig
from resnet_scale.train.integrity import MARKER as _MARKER
from resnet_scale.train.integrity import Damaged, check_files, printable, refused_pickle, write_marker
from resnet_scale.train.signals import uninterrupted
from resnet_scale.train.state import LoopState

logger = logging.getLogger("resnet_scale")

CHECKPOINTS = "checkpoints"
#: Exit status of a run that saved a checkpoint and stopped because it was asked to (SIGTERM,
#: SIGUSR1, a first Ctrl-C): EX_TEMPFAIL, "try again later" — resume with --resume auto.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved; the CLI exits with EXIT_PREEMPTED."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"preempted: saved {checkpoint}; continue with --resume auto")
        self.checkpoint = checkpoint


def checkpoint_dirs(run_path: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_path) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / _MARKER).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(run_path: Path) -> Path | None:
    found = checkpoint_dirs(run_path)
    return found[-1] if found else None


def save_checkpoint(accelerator: Accelerator, run_path: Path, step: int, loop_state: LoopState,
                    keep: int) -> Path:
    root = Path(run_path) / CHECKPOINTS
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with uninterrupted():  # a second Ctrl-C waits for the rename: never between rmtree and replace
            (tmp / "loop_state.json").write_text(json.dumps(loop_state.to_dict(), indent=2) + "\n")
            write_marker(tmp, step)  # every rank's files are in tmp now: sizes and digests of all of them
            if final.exists():  # the same step saved again (epoch end right after a step checkpoint)
                shutil.rmtree(final)
            os.replace(tmp, final)
            # The oldest go, never the one just saved: a run resumed from an older checkpoint (a newer one
            # was damaged, or --resume PATH) may have newer ones of the abandoned trajectory around.
            others = [p for p in checkpoint_dirs(run_path) if p != final]
            for old in others[:len(others) - (keep - 1)]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def newest_intact_checkpoint(run_path: Path) -> Path | None:
    """The newest complete checkpoint of a run whose files are all as saved (None when the run has
    none at all). Damaged newer ones are skipped, saying so in one line; when every one is damaged
    the resume is refused. Reads every file of the checkpoints it checks: call it once, to resume."""
    found = checkpoint_dirs(run_path)
    damaged: list[tuple[str, Damaged]] = []
    for path in reversed(found):
        try:
            verified = check_files(path)
        except Damaged as problem:
            damaged.append((path.name, problem))
            continue
        if damaged:
            _say(f"{_are_damaged(damaged)}; resuming from {path.name}, the newest intact one")
        if not verified:
            _say(f"checkpoint {path} has no checksums (saved by an older resnet-scale), not verified")
        return path
    if damaged:
        raise ConfigError(f"no intact checkpoint in {Path(run_path) / CHECKPOINTS}: {_are_damaged(damaged)}. "
                          "Nothing was changed; restore them from a copy, or start over under another --run-name.")
    return None


def _say(warning: str) -> None:
    """A warning of the resume's choice, from the main process only (called before the processes
    are connected, every process checks the same files and comes to the same choice)."""
    if int(os.environ.get("RANK", "0")) == 0:
        logger.warning(warning)


def _are_damaged(damaged: list[tuple[str, Damaged]]) -> str:
    if len(damaged) == 1:
        return f"checkpoint {damaged[0][0]} is damaged ({damaged[0][1]})"
    return f"checkpoints {', '.join(f'{name} ({problem})' for name, problem in damaged)} are damaged"


def _decided_once(decide):
    """``decide()`` on the main process only, its result (or refusal) given to every process: with
    several processes each must resume from the same checkpoint, or refuse with the same line."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", decide())]
        except ConfigError as err:
            box = [("refused", str(err))]
        except Exception as err:  # noqa: BLE001 - the others must not wait for a result that never comes
            dist.broadcast_object_list([("failed", f"{type(err).__name__}: {err}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "refused":
        raise ConfigError(value)
    if kind == "failed":
        raise RuntimeError(f"the main process could not choose the checkpoint to resume from ({value})")
    return value


def resolve_resume(resume: str | None, run_path: Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` = the newest intact one of this run (None when there
    is none: a fresh start), or a given checkpoint folder, refused when a file of it is not as saved.
    Decided by the main process for all of them."""
    if resume is None:
        return None
    if resume == "auto":
        return _decided_once(lambda: newest_intact_checkpoint(run_path))
    path = Path(resume)
    if not (path / _MARKER).is_file() or not (path / "loop_state.json").is_file():
        raise ConfigError(
            f"--resume {resume}: not a complete checkpoint (a folder with loop_state.json and {_MARKER}, "
            f"under <run>/{CHECKPOINTS}/); use --resume auto for the newest one of the run."
        )

    def verify() -> Path:
        try:
            if not check_files(path):
                _say(f"checkpoint {path} has no checksums (saved by an older resnet-scale), not verified")
        except Damaged as problem:
            raise ConfigError(f"--resume {resume}: the checkpoint is damaged ({problem}). Nothing was loaded; "
                              "resume from another checkpoint with --resume PATH (or the newest intact one "
                              "with --resume auto).") from None
        return path

    return _decided_once(verify)


def _safe_globals() -> list:
    """Classes a checkpoint of ours may hold besides tensors, numbers, strings and containers:
    numpy arrays of the RNG states (Accelerate's own allowlist) and DeepSpeed's optimizer-state
    records. All of them are plain data; none runs code from the file."""
    allowed: list = []
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        allowed += list(TORCH_SAFE_GLOBALS)
    except ImportError:  # an Accelerate without the list: numpy RNG states then fail closed
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # no DeepSpeed: its checkpoints cannot be resumed anyway
        pass
    return allowed


def elastic_train_config(cfg: Config) -> TrainConfig:
    """Under ``torchrun --max-restarts N`` a restarted group continues the run from its newest
    checkpoint by itself. Its folder must survive the restart: ``--run-name``, else a name made
    from torchrun's rendezvous id (``--rdzv-id``, or the uuid of ``--standalone``), which every
    attempt shares. Attempt 0 is an ordinary start (an existing run folder is still refused)."""
    t = cfg.train
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) < 1:
        return t
    if t.resume not in (None, "auto"):  # --resume PATH: the run it belongs to
        checkpoint = Path(t.resume).resolve()
        t = dataclasses.replace(t, output_dir=str(checkpoint.parents[2]), run_name=checkpoint.parents[1].name)
    if t.run_name is None:
        from resnet_scale.config import default_run_name

        rid = re.sub(r"[^A-Za-z0-9]", "", os.environ.get("TORCHELASTIC_RUN_ID", ""))
        if not rid or rid == "none":
            raise ConfigError("torchrun --max-restarts restarts the run in the same folder: give --run-name NAME "
                              "(or torchrun --rdzv-id ID) so a restarted group finds its checkpoints.")
        t = dataclasses.replace(t, run_name=default_run_name(cfg, suffix=rid[:12]))
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        t = dataclasses.replace(t, resume="auto")
    return t


def verify_checkpoint_files(path: Path) -> None:
    """Read every file of a checkpoint the safe way before Accelerate or DeepSpeed load it: pickle
    files (.bin/.pkl/.pt) with torch's ``weights_only`` unpickler (it refuses any global that is
    not on the allowlist, so a crafted file cannot run code), .safetensors completely. Accelerate
    unpickles registered objects and DeepSpeed its partitions with ``weights_only=False``; this
    check is what makes that safe. A truncated or corrupt file is refused here too."""
    import torch
    from safetensors.torch import load_file

    allowed = _safe_globals()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        try:
            if file.suffix in (".bin", ".pkl", ".pt", ".pth"):
                with torch.serialization.safe_globals(allowed):
                    torch.load(file, map_location="cpu", weights_only=True)
            elif file.suffix == ".safetensors":
                load_file(str(file))
        except Exception as err:  # noqa: BLE001 - any failure: this file must not be loaded
            text = str(err)
            first = text.strip().splitlines()[0] if text.strip() else ""
            unsafe = "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in first
            raise ConfigError(
                f"checkpoint file {file} is refused: "
                + (f"{refused_pickle(text)}; it was not written by resnet-scale or was altered. " if unsafe
                   else f"it is truncated or corrupt ({type(err).__name__}: {printable(first)}). ")
                + "Nothing was loaded; resume from another checkpoint with --resume PATH."
            ) from None


def load_checkpoint(accelerator: Accelerator, path: Path) -> LoopState:
    """Restore model, optimizer, registered scheduler and RNG states; return the loop state (checked
    first: a bad ``loop_state.json`` is refused before the model or optimizer change)."""
    verify_checkpoint_files(path)
    try:
        loop_state = LoopState.from_dict(json.loads((path / "loop_state.json").read_text()))
        accelerator.load_state(str(path))
    except Exception as err:  # noqa: BLE001 - whatever the engine raises, say which checkpoint
        raise ConfigError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); "
                          "resume from an earlier one with --resume PATH.") from None
    return loop_state
