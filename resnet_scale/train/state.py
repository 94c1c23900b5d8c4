"""Everything the training loop counts, in one place: :class:`LoopState`.

A checkpoint saves it as ``loop_state.json``, a resumed run starts from it, and the run's summary
reports it. The JSON keys are the dataclass's field names, in field order.
"""

from __future__ import annotations

import dataclasses
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
