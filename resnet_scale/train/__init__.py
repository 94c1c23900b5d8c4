"""Training: ``train(cfg)`` sets a run up (``setup.py``), runs the loop (``trainer.py``, one step in
``step.py`` / ``oom.py``, decisions in ``control.py``, metrics in ``metrics.py``), counts in one
``LoopState`` (``state.py``) that checkpoints save (``checkpoint.py``; their files' checksums:
``integrity.py``), and finishes it (``finish.py``: summary, weights, trackers). The run's files:
``run_dir.py``; optimizer and schedule: ``optim.py``; what the terminal shows: ``progress.py``; what
a signal does: ``signals.py``; refusals every rank takes together: ``agree.py``."""

from resnet_scale.train.metrics import evaluate
from resnet_scale.train.trainer import train

__all__ = ["train", "evaluate"]
