"""Everything the training loop counts, in one place: :class:`LoopState`.

A checkpoint saves it as ``loop_state.json``, a resumed run starts from it, and the run's summary
reports it. The JSON keys are the dataclass's field names, in field order.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from resnet_scale.config import ConfigError

#: The keys of the two dict-valued fields: a test evaluation (``metrics.evaluate``) and the sums of
#: an unfinished log interval (``metrics.Window.snapshot``).
DICT_KEYS = {"last_eval": ("loss", "accuracy", "samples"), "window": ("loss_sum", "correct", "count", "elapsed")}


@dataclass
class LoopState:
    """The loop's counters, clocks and results so far. ``epoch``/``epoch_step`` and ``window`` are
    where a resumed run continues: it skips the first ``epoch_step`` batches of ``epoch`` and carries
    on the interrupted log interval."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    epoch_step: int = 0  # batches of that epoch already trained
    best: float = 0.0  # best test accuracy so far
    last_eval: dict[str, float] | None = None  # the newest test evaluation: loss, accuracy, samples
    skipped: int = 0  # steps whose update was withheld (fp16 overflow or a non-finite gradient)
    time_to_target: float | None = None  # run time (s) at the first evaluation reaching --target-accuracy
    last_logged_step: int = 0  # step of the newest train line (the next one's step_time_s counts from it)
    last_grad_norm: float | None = None  # gradient norm of the newest finite step
    train_time: float = 0.0  # seconds inside the logged train intervals (images_per_s of the summary)
    train_images: int = 0  # images in those intervals, over all processes
    elapsed: float = 0.0  # run time (s) so far, earlier attempts of a resumed run included
    window: dict[str, float] | None = None  # sums of the log interval in progress (see DICT_KEYS)
    metrics_lines: int = 0  # lines in metrics.jsonl; a resumed run cuts the file back to them
    bad_steps: int = 0  # steps with a non-finite loss or gradient in the whole run
    tracker_run_id: str | None = None  # the tracker's run, which a resumed run continues

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``loop_state.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Any) -> "LoopState":
        """The state of a saved ``loop_state.json``. Refuses (ConfigError) an unknown key, a value of the
        wrong type or a missing ``metrics_lines``/``window`` that resuming needs. Other missing keys take
        their defaults, as they did for checkpoints written before those keys existed."""
        if not isinstance(saved, dict):
            raise ConfigError(f"loop_state.json holds {type(saved).__name__}, not an object of loop counters")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(saved) - set(hints))
        if unknown:
            raise ConfigError(f"loop_state.json has unknown key(s) {', '.join(map(repr, unknown))}; "
                              f"it may hold only {', '.join(hints)}")
        for name, value in saved.items():
            if not _fits(value, hints[name]):
                raise ConfigError(f"loop_state.json: {name} is {_show(value)}, expected {_describe(hints[name])}")
            if name in DICT_KEYS and value is not None and sorted(value) != sorted(DICT_KEYS[name]):
                raise ConfigError(f"loop_state.json: {name} has the keys {', '.join(sorted(value)) or 'none'}, "
                                  f"expected {', '.join(DICT_KEYS[name])}")
        if "metrics_lines" not in saved:
            raise ConfigError("loop_state.json has no metrics_lines: the lines of metrics.jsonl it belongs to")
        state = cls(**saved)
        if state.epoch_step and state.window is None:
            raise ConfigError(f"loop_state.json: saved after batch {state.epoch_step} of an epoch but without "
                              "the window (the sums of the interrupted log interval)")
        return state

    def check(self, *, steps_per_epoch: int, total_steps: int) -> None:
        """Refuse (ConfigError, the reason) values that are well typed but impossible for a run of
        ``total_steps`` steps in epochs of ``steps_per_epoch``: a position that is not a step of the run
        or does not add up, counters beyond the step, NaN/inf or out-of-range numbers."""
        spe = steps_per_epoch
        if not 1 <= self.step <= total_steps:
            raise ConfigError(f"step {self.step} is not a step of this run, which has {total_steps} steps "
                              "(--max-steps / --epochs)")
        if self.epoch_step > spe or self.epoch * spe + self.epoch_step != self.step:
            raise ConfigError(f"step {self.step} is not epoch {self.epoch} x {spe} steps per epoch + batch "
                              f"{self.epoch_step} (this run has {spe} steps per epoch: --batch-size over the "
                              "train images)")
        for name in ("last_logged_step", "skipped", "bad_steps"):
            if getattr(self, name) > self.step:
                raise ConfigError(f"{name} is {getattr(self, name)}, more than the {self.step} steps done")
        # What the loop guarantees: clocks and accuracies are finite, the window sums only finite steps. (A test
        # loss or a gradient norm under fp16 may be inf/NaN in a real run: not checked.)
        numbers = {"best": self.best, "time_to_target": self.time_to_target, "train_time": self.train_time,
                   "elapsed": self.elapsed}
        numbers.update({f"last_eval.{k}": v for k, v in (self.last_eval or {}).items() if k != "loss"})
        numbers.update({f"window.{k}": v for k, v in (self.window or {}).items() if k != "loss_sum"})
        for name, value in numbers.items():
            if value is not None and not 0 <= value < math.inf:
                raise ConfigError(f"{name} is {_show(value)}, expected a finite number >= 0")
        if self.window and not math.isfinite(self.window["loss_sum"]):
            raise ConfigError(f"window.loss_sum is {_show(self.window['loss_sum'])}, expected a finite number")
        for name, value in (("best", self.best), ("last_eval.accuracy", (self.last_eval or {}).get("accuracy"))):
            if value is not None and value > 1:
                raise ConfigError(f"{name} is {_show(value)}, expected an accuracy between 0 and 1")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON has the annotated type: counts are integers >= 0, an int is a
    valid float, JSON true/false is neither."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return False
    if hint is int:
        return isinstance(value, int) and value >= 0
    if hint is float:
        return isinstance(value, (int, float))
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is dict:
        return isinstance(value, dict) and all(_fits(v, float) for v in value.values())
    raise TypeError(f"LoopState cannot check a field of type {hint}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    names = {int: "a count (an integer >= 0)", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, "an object of numbers")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
