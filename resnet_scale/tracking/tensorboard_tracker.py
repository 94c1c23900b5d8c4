"""The TensorBoard tracker: event files under ``<run_dir>/tensorboard`` (``tensorboard --logdir
<output_dir>``).

``TensorBoardTracker`` is an Accelerate tracker (``accelerate.tracking.GeneralTracker``; ``tracker``
is the ``SummaryWriter``), guarded like every tracker here. It writes the scalars, the config as
text, and at the end the run's hyperparameters (the config, flat: ``model.block``, ``optim.lr`` ...)
with its final metrics (``hparam/final_accuracy`` ...) for TensorBoard's HParams tab. A resumed run
writes on into the same folder (a new event file; TensorBoard reads them as one run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

from resnet_scale.tracking.tracker_base import (
    PACKAGE_HINTS,
    Guarded,
    TrackingError,
    _number,
    build_tracker_config,
    hparams_of,
)

#: Summary values that become the HParams tab's metrics (``hparam/<key>``).
HPARAM_METRICS = ("final_accuracy", "best_accuracy", "final_test_loss", "wall_time_s", "images_per_s",
                  "time_to_target_s", "peak_memory_bytes", "steps")


class TensorBoardTracker(Guarded, GeneralTracker):
    name = "tensorboard"
    label = "TensorBoard"
    requires_logging_directory = True
    run_id: str | None = None  # the folder is the run: a resumed run writes on into it

    def __init__(self, writer, config: dict[str, Any]):
        super().__init__()
        self._writer = writer
        self._config = config
        self.store_init_configuration(config)

    @property
    def tracker(self):
        return self._writer

    def store_init_configuration(self, values: dict) -> None:
        text = "```json\n" + json.dumps(values, indent=2, default=str) + "\n```"
        self._guard("config", lambda: self._writer.add_text("config", text))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self._guard("log", self._log, values, step)

    def _log(self, values: dict, step: int | None) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", self._summary, values)

    def _summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if _number(value):
                self._writer.add_scalar(f"summary/{key}", value, 0)
        self._writer.add_text("summary", "```json\n" + json.dumps(values, indent=2, default=str) + "\n```")
        self.add_hparams(values)

    def add_hparams(self, values: dict[str, Any]) -> None:
        """The hyperparameters with the final metrics, in this run's own event file (what
        ``SummaryWriter.add_hparams`` writes, without the extra sub-run it makes)."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"hparam/{k}": float(values[k]) for k in HPARAM_METRICS if _number(values.get(k))}
        experiment, session_start, session_end = hparams(hparams_of(self._config), metrics)
        writer = self._writer._get_file_writer()
        for summary in (experiment, session_start, session_end):
            writer.add_summary(summary)
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, 0)

    def log_weights(self, files: list, metadata: dict[str, Any] | None = None) -> None:
        pass  # the weights are in the run folder beside the event files

    def finish(self) -> None:
        self._guard("finish", lambda: self._writer.close())
        self.dropped = True


def build_tensorboard(run_dir: Path, config: dict) -> TensorBoardTracker:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrackingError(PACKAGE_HINTS["tensorboard"]) from None
    return TensorBoardTracker(SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard")), build_tracker_config(config))
