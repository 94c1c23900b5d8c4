"""Training: ``train(cfg)`` sets a run up (``setup.py``), runs the loop (``trainer.py``, one step in
``step.py`` / ``oom.py``, decisions in ``control.py``, metrics in ``metrics.py``), counts in one
``LoopState`` (``state.py``) that checkpoints save (``checkpoint.py``; their files' checksums:
``integrity.py``), and finishes it (``finish.py``: summary, weights, trackers). The run's files:
``run_dir.py``; optimizer and schedule: ``optim.py``; what the terminal shows: ``progress.py``; what
a signal does: ``signals.py``; refusals every rank takes together: ``agree.py``; what a run changes
in its process and puts back: ``process_state.py``.

``resnet_scale.train`` is this package and is also callable: ``resnet_scale.train(cfg)`` is
``resnet_scale.train.train(cfg)``. (A package and a function cannot share the name any other way:
Python sets ``resnet_scale.train`` to the package whenever the package is imported.)
"""

import sys
import types

from resnet_scale.train.metrics import evaluate
from resnet_scale.train.trainer import train

__all__ = ["train", "evaluate"]


class _CallablePackage(types.ModuleType):
    """This package, callable as :func:`resnet_scale.train.trainer.train`."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
__wrapped__ = train  # inspect.signature(resnet_scale.train) is train()'s
