"""Resuming a run: its own ``config.json`` is the config, its files are checked before anything
changes, and a finished run is never touched.

The order is fixed: :func:`open_resume` reads the run's config and lays the asked settings over it
(nothing built yet); :meth:`Resume.check` refuses settings that would change the run's trajectory
unless ``--override`` names them, and stops at a finished run; :func:`check_loop_state` validates the
checkpoint's ``loop_state.json`` against the run being built and the run's files. Only after all of
that, and after the checkpoint has loaded, does the trainer cut ``metrics.jsonl`` or write
``config.json`` (``setup._open_folder``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnet_scale.config import Config, ConfigError
from resnet_scale.config.compare import MODEL, RUN_SETTINGS, Difference, differences, fields, flag_of, overlay, show
from resnet_scale.train.checkpoint import resolve_resume
from resnet_scale.train.run_dir import read_run_config
from resnet_scale.train.state import LoopState

logger = logging.getLogger("resnet_scale")


class RunFinished(Exception):
    """``--resume auto`` of a run that has finished (it has ``summary.json``): nothing to do, and
    nothing of it was changed. ``train`` returns the run's summary."""

    def __init__(self, message: str, summary: dict[str, Any] | None):
        super().__init__(message)
        self.summary = summary


@dataclass
class Resume:
    """What a run continues from; a new run has ``run_cfg`` None."""

    cfg: Config  # the config to train with: the run's, with the asked free settings (and overrides) on top
    given: frozenset[str]  # the settings the command asked for
    overrides: frozenset[str]  # what --override lets differ
    path: Path | None = None  # the run folder (None: a new run whose name is generated)
    checkpoint: Path | None = None  # where the run continues (None: from step 0)
    run_cfg: Config | None = None  # the run's config.json
    saved: dict[str, Any] = field(default_factory=dict)  # all of config.json
    changes: list[Difference] = field(default_factory=list)  # differences --override allowed (recorded)

    @property
    def start_over(self) -> bool:
        """--resume auto of a run killed before its first checkpoint: step 0 in the same folder."""
        return self.run_cfg is not None and self.checkpoint is None

    def check(self, cfg: Config, *, precision: str, world_size: int) -> None:
        """Refuse what the resume may not change, with every difference in one line; stop (RunFinished)
        at a finished run. ``cfg`` is the config after the memory plan, ``precision`` the one resolved."""
        if self.run_cfg is None:
            return
        found = differences(self.run_cfg, cfg)
        saved_memory = self.saved.get("memory") or {}
        if saved_memory.get("precision") not in (None, precision):
            found.append(Difference("memory.precision", saved_memory["precision"], precision))
        saved_world = self.saved.get("world_size")
        if isinstance(saved_world, int) and saved_world != world_size:
            if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:  # torchrun chose it, not the user
                logger.info(f"torchrun restart: {world_size} process(es), the run had {saved_world}")
            else:
                found.append(Difference("world_size", saved_world, world_size))
        found = [d if d.name in self.given or d.name == "world_size" else
                 Difference(d.name, d.run, d.new, " (what --low-memory / --max-memory pick)") for d in found]
        model = [d for d in found if d.name in MODEL]
        if model:
            raise ConfigError(f"{self._where()} holds a {describe_model(self.run_cfg)}; "
                              f"{', '.join(d.describe() for d in model)}: a checkpoint loads only into the model it "
                              "was saved from. Nothing was changed; train another model as a new run (another "
                              "--run-name, without --resume).")
        refused = [d for d in found if d.name not in self.overrides]
        if refused:
            names = ",".join(d.name if d.name in RUN_SETTINGS else flag_of(d.name).lstrip("-").replace("-", "_")
                             for d in refused)
            raise ConfigError(f"run {self.path} resumes with its own config ({self.path / 'config.json'}): "
                              f"{'; '.join(d.describe() for d in refused)}. Nothing was changed. Leave "
                              f"{'this flag' if len(refused) == 1 else 'these flags'} out to continue the run as it "
                              f"was, or add --override {names} to change {'it' if len(refused) == 1 else 'them'} "
                              "from the resumed step on (config.json records the change).")
        self.changes = found
        if (self.path / "summary.json").exists():
            self._finished()
        if self.start_over and (self.path / "model.safetensors").exists():
            raise ConfigError(f"run {self.path} has final weights (model.safetensors) but no checkpoint to resume "
                              "from; starting it over would overwrite them. Nothing was changed; start a new "
                              "run (another --run-name).")

    def check_model(self, num_parameters: int) -> None:
        """The model built has the run's number of parameters (the classes of the data count too)."""
        saved = self.saved.get("num_parameters")
        if self.run_cfg is not None and isinstance(saved, int) and saved != num_parameters:
            raise ConfigError(f"{self._where()} holds a {describe_model(self.run_cfg)} of {saved:,} parameters; "
                              f"this run builds one of {num_parameters:,} (another number of classes in the "
                              "data?): a checkpoint loads only into the model it was saved from. Nothing was "
                              "changed; train another model as a new run (another --run-name, without --resume).")

    def _where(self) -> str:
        return f"checkpoint {self.checkpoint}" if self.checkpoint else f"run {self.path}"

    def _finished(self) -> None:
        try:
            summary = json.loads((self.path / "summary.json").read_text())
            steps = f"{summary['steps']} steps, " if isinstance(summary, dict) and "steps" in summary else ""
        except (OSError, ValueError):
            summary, steps = None, ""
        what = f"run {self.path} is finished ({steps}summary.json and model.safetensors written)"
        if self.cfg.train.resume != "auto":
            raise ConfigError(f"{what}; resuming it from {self.checkpoint.name} would overwrite them and cut "
                              "metrics.jsonl. Nothing was changed; to train on from that checkpoint, copy the run "
                              "folder and resume the copy, or start a new run.")
        if self.changes:
            raise ConfigError(f"{what}; --override cannot change a finished run. Nothing was changed; start a "
                              "new run (another --run-name) with the settings you want.")
        message = (f"{what}: nothing to do, and none of its files was changed. To train again, start a new run "
                   "(another --run-name, or leave out --resume).")
        if int(os.environ.get("RANK", "0")) == 0:
            logger.info(message)
        raise RunFinished(message, summary)

    def record(self, step: int) -> list[dict[str, Any]]:
        """config.json's ``overrides`` after this resume: the earlier ones and this one's changes."""
        return list(self.saved.get("overrides") or []) + [d.record(step) for d in self.changes]

    def recorded_config(self, cfg: Config) -> Config:
        """The run's config with the overridden settings changed (the others stay the run's)."""
        out = overlay(self.run_cfg, cfg, [d.name for d in self.changes if d.name in fields()])
        for d in self.changes:
            if d.name == "memory.precision":
                out.memory.precision = d.new
        return out


def describe_model(cfg: Config) -> str:
    """E.g. ``basic depth-18 model (stages 2,2,2,2, cifar stem)``."""
    layers, _ = cfg.layers()
    name = f"depth-{cfg.model.depth}" if cfg.model.layers is None else "custom"
    return f"{cfg.model.block} {name} model (stages {show(layers)}, {cfg.stem()} stem)"


def open_resume(cfg: Config, given: frozenset[str] | None, overrides: frozenset[str]) -> Resume:
    """Find the run a --resume continues and lay the asked settings over its config.json (reads only).
    ``given`` None means every setting of ``cfg`` was asked for (a Config passed to ``train``)."""
    t = cfg.train
    given = frozenset(fields()) if given is None else frozenset(given)
    if overrides and t.resume is None:
        raise ConfigError("--override lets a resumed run differ from its config.json; it needs --resume auto "
                          "--run-name NAME (or --resume PATH). A new run takes every flag as given.")
    if t.resume is None:
        return Resume(cfg=cfg, given=given, overrides=overrides)
    checkpoint = resolve_resume(t.resume, Path(t.output_dir) / (t.run_name or ""))
    path = checkpoint.resolve().parents[1] if t.resume != "auto" else Path(t.output_dir) / t.run_name
    resume = Resume(cfg=cfg, given=given, overrides=overrides, path=path, checkpoint=checkpoint)
    config_path = path / "config.json"
    if not config_path.is_file():
        if checkpoint is not None:
            raise ConfigError(f"{path} holds no run (no config.json) to resume; nothing was changed.")
        return resume  # --resume auto of a run that does not exist yet: a fresh start
    saved, run_cfg = read_run_config(config_path, "; nothing was changed")
    merged = overlay(run_cfg, cfg, given)
    merged.train.output_dir, merged.train.run_name, merged.train.resume = str(path.parent), path.name, t.resume
    resume.cfg, resume.run_cfg, resume.saved = merged.validate(), run_cfg, saved
    return resume


def check_loop_state(checkpoint: Path, *, steps_per_epoch: int, total_steps: int, metrics_path: Path) -> LoopState:
    """The checkpoint's loop state, refused (ConfigError) unless its values are possible for this run
    and agree with the checkpoint's folder name and the run's metrics.jsonl. Changes nothing."""
    try:
        state = LoopState.from_dict(json.loads((checkpoint / "loop_state.json").read_text()))
        found = re.fullmatch(r"step-(\d+)", checkpoint.name)
        if found is None or int(found.group(1)) != state.step:
            raise ConfigError(f"loop_state.json says step {state.step}, the folder is {checkpoint.name}")
        state.check(steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        _check_metrics(state, metrics_path)
    except (OSError, ValueError, ConfigError) as err:
        raise ConfigError(f"checkpoint {checkpoint} cannot be loaded: {err}. Nothing was changed; it was altered "
                          "or belongs to another run: resume from an earlier one with --resume PATH.") from None
    return state


def _check_metrics(state: LoopState, path: Path) -> None:
    """The lines the checkpoint keeps exist and come up to its step; those it cuts come after it."""
    lines = path.read_text().splitlines() if path.exists() else []
    if state.metrics_lines > len(lines):
        raise ConfigError(f"metrics_lines is {state.metrics_lines}, but {path.name} has {len(lines)} lines")
    for number, line in enumerate(lines, start=1):
        try:
            step = json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            if number <= state.metrics_lines:
                raise ConfigError(f"{path.name} line {number}, which the checkpoint keeps, is not an event "
                                  "with a step") from None
            continue  # a line after the checkpoint (e.g. half written when a run was killed): it is cut
        if number <= state.metrics_lines and not step <= state.step:
            raise ConfigError(f"{path.name} line {number} is of step {step}, after the checkpoint's step {state.step}")
        if number > state.metrics_lines and not step >= state.step:
            raise ConfigError(f"{path.name} line {number} is of step {step}, before the checkpoint's step "
                              f"{state.step}, yet metrics_lines {state.metrics_lines} would cut it")


def hyperparameters(optimizer) -> list[dict[str, Any]]:
    """The optimizer's settings per parameter group as built from this config (before a checkpoint
    loads and puts the saved ones back)."""
    return [copy.deepcopy({k: v for k, v in group.items() if k != "params"}) for group in optimizer.param_groups]


def restore_hyperparameters(optimizer, scheduler, built: list[dict[str, Any]]) -> None:
    """Put this config's optimizer settings (``built``) back after a checkpoint loaded the saved ones, and
    recompute the current learning rate with this config's peak rate and schedule. Loading restores the
    scheduler's ``base_lrs`` and every group's ``lr``/``momentum``/``weight_decay``: without this an
    ``--override lr`` would silently keep the old rate. Unchanged settings give the very same floats."""
    for group, own in zip(optimizer.param_groups, built):
        group.update({k: v for k, v in own.items() if k != "lr"})
    scheduler.base_lrs = [own["initial_lr"] for own in built]
    rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates
