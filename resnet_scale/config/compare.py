"""A resumed run keeps its own config: which settings may differ from the run's ``config.json``.

A setting *changes the trajectory* when two runs that differ only in it train different weights
(model, data, optimizer, schedule, batch, seed, length, engine). A resumed run takes every such
setting from the run; a flag that asks for another value is refused unless ``--override NAME``
names it. Every other setting (where files go, what is logged and how often, checkpoint cadence,
how memory is spent to compute the same steps) may differ freely: :data:`FREE` lists them, and a
field added to the schema later is a trajectory setting until it is listed here.

Settings are compared by what they resolve to, not by how they are spelled: ``--stem cifar``
equals the ``auto`` of a 32-px run, ``--layers 2,2,2,2`` equals ``--depth 18``. The precision is
compared after ``--low-memory``/``--max-memory`` have picked it (by the trainer, which knows the
plan), so it is not compared here.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from resnet_scale.config.errors import ConfigError
from resnet_scale.config.schema import Config

#: Settings a resumed run may change without --override: they do not change which weights it trains.
FREE = frozenset({
    # where the run is and whether it continues
    "train.output_dir", "train.run_name", "train.resume",
    # what is reported, where, and how often
    "train.tracker", "train.wandb_project", "train.wandb_entity", "train.run_group", "train.tags",
    "train.target_accuracy", "train.log_every", "train.eval_every", "distributed.record_samples",
    # when checkpoints are saved and when a run stops or is requeued
    "train.checkpoint_every", "train.checkpoint_every_minutes", "train.keep_checkpoints", "train.max_bad_steps",
    "train.requeue",
    # the hardware and how memory is spent on the same steps (the precision is compared once resolved)
    "train.device", "train.deterministic", "memory.precision", "memory.channels_last", "memory.checkpointing",
    "memory.checkpoint_impl", "memory.micro_batch_size", "memory.grad_accum_steps", "memory.offload_activations",
    "memory.oom_recovery", "memory.low_memory", "memory.max_memory",
    # (not memory.compile: compiled epochs leave out their partial last batch, so they train other batches;
    # not memory.activation_compression: quantized saved activations give other gradients)
    # how the same images are read
    "data.download", "data.in_memory", "data.in_memory_limit_gib", "data.num_workers",
})

#: Not config fields, but settings of a run --override can name: checked by the trainer.
RUN_SETTINGS = {"world_size": "the number of processes"}

#: The model a checkpoint holds: these must match whatever --override says.
MODEL = ("model.block", "model.depth", "model.layers", "model.stem")


def _padding(cfg: Config) -> int:
    return cfg.data.crop_padding if cfg.data.crop_padding is not None else cfg.image_size() // 8


#: Fields compared by what they resolve to (two spellings of one setting are equal).
_RESOLVED: dict[str, Callable[[Config], Any]] = {
    "model.depth": lambda c: c.layers()[0],
    "model.layers": lambda c: c.layers()[0],
    "model.stem": Config.stem,
    "data.image_size": Config.image_size,
    "data.augment": lambda c: c.data.resolved_augment(),
    "data.crop_padding": _padding,
    "distributed.distributed": Config.engine,
    "memory.activation_compression": lambda c: c.memory.activation_compression or "none",  # unset = none
    "train.epochs": lambda c: c.train.epochs if c.train.max_steps is None else None,  # unused with --max-steps
    "data.data_dir": lambda c: c.data.data_dir if c.data.source not in ("synthetic", "digits") else None,
    **{f"data.synthetic_{n}": (lambda c, n=n: getattr(c.data, f"synthetic_{n}")
                               if c.data.source == "synthetic" else None)
       for n in ("train_samples", "test_samples", "classes")},
}


def fields() -> dict[str, dataclasses.Field]:
    """Every setting of :class:`Config` as ``section.name`` -> its dataclass field."""
    defaults = Config()
    return {f"{section.name}.{f.name}": f for section in dataclasses.fields(Config)
            for f in dataclasses.fields(getattr(defaults, section.name))}


def flag_of(name: str) -> str:
    """``optim.lr`` -> ``--lr`` (a field may name its flag: ``data.source`` -> ``--data``)."""
    if name in RUN_SETTINGS:
        return name
    f = fields()[name]
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def get(cfg: Config, name: str) -> Any:
    section, key = name.split(".", 1)
    return getattr(getattr(cfg, section), key)


def show(value: Any) -> str:
    """A value as it would be typed after its flag."""
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


@dataclass(frozen=True)
class Difference:
    """One setting that differs between a run's config and the config a resume asks for."""

    name: str  # section.field, or a RUN_SETTINGS key
    run: Any  # the run's value
    new: Any  # the asked value
    note: str = ""  # where the asked value came from, when not from its own flag

    def describe(self) -> str:
        if self.name in RUN_SETTINGS:
            return f"{RUN_SETTINGS[self.name]} {show(self.new)} differs from the run's {show(self.run)}"
        return f"{flag_of(self.name)} {show(self.new)}{self.note} differs from the run's {show(self.run)}"

    def record(self, step: int) -> dict[str, Any]:
        """The entry config.json's ``overrides`` keeps: what changed, and after which step."""
        return {"after_step": step, "setting": self.name, "flag": flag_of(self.name), "from": self.run, "to": self.new}


def differences(run: Config, new: Config) -> list[Difference]:
    """The trajectory settings in which ``new`` differs from ``run`` (not the precision): set to another
    value that also resolves to another one."""
    found = []
    for name in fields():
        if name in FREE:
            continue
        key = _RESOLVED.get(name)
        if get(run, name) != get(new, name) and (key is None or key(run) != key(new)):
            found.append(Difference(name, get(run, name), get(new, name)))
    return found


def overlay(base: Config, asked: Config, given: Iterable[str]) -> Config:
    """``base`` with the ``given`` settings taken from ``asked``; a given setting unsets its alternative
    in ``base`` (``--micro-batch-size`` on a run saved with ``grad_accum_steps``)."""
    from resnet_scale.config.args import drop_alternatives

    out = copy.deepcopy(base)
    given = set(given)
    for name in given:
        section, key = name.split(".", 1)
        setattr(getattr(out, section), key, copy.deepcopy(get(asked, name)))
    return drop_alternatives(out, given)


def parse_overrides(text: str | tuple[str, ...] | None) -> frozenset[str]:
    """``--override lr,max-grad-norm`` -> ``{"optim.lr", "optim.max_grad_norm"}``: names are flags
    with or without their dashes, field names, or ``section.field``; also ``world_size``."""
    if not text:
        return frozenset()
    parts = text.split(",") if isinstance(text, str) else list(text)
    known = fields()
    by_flag = {flag_of(name)[2:]: name for name in known}
    # field names too (memory.checkpointing's flag is --activation-checkpointing) and old flag names
    by_flag.update({n.split(".", 1)[1].replace("_", "-"): n for n in known if n.split(".", 1)[1].replace("_", "-")
                    not in by_flag})
    by_flag.update({alias.replace("_", "-"): n for n, f in known.items() for alias in f.metadata.get("aliases", ())})
    out = set()
    for part in (p.strip() for p in parts):
        if not part:
            continue
        word = part.lstrip("-").replace("_", "-")
        if word in RUN_SETTINGS or word.replace("-", "_") in RUN_SETTINGS:
            out.add(word.replace("-", "_"))
        elif part in known:
            out.add(part)
        elif word in by_flag:
            out.add(by_flag[word])
        else:
            raise ConfigError(f"--override {part}: no such setting; name flags without their dashes, "
                              "e.g. --override lr,max-grad-norm (or world_size).")
    return frozenset(out)
