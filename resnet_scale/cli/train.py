"""``resnet-scale train``: train a ResNet, in one process or in many under ``accelerate launch`` /
``torchrun -m resnet_scale train``.

Exit status: 0 done; 1 out of memory even at a micro-batch of one, or the run's files could not
be written; 2 bad input (one line, before anything is changed); 4 stopped after too many
non-finite steps; 75 pre-empted (SIGTERM/SIGUSR1): a checkpoint was saved, ``--resume auto``
continues.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from resnet_scale.cli.parser import EXIT_BAD_INPUT, standalone
from resnet_scale.config import ConfigError, add_config_arguments, config_from_args, given_fields
from resnet_scale.config.compare import parse_overrides

NAME = "train"
HELP = "train a ResNet (one process, or many under accelerate launch / torchrun)"
DESCRIPTION = "Train a ResNet. --batch-size is the global batch over all processes."


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_config_arguments(parser)
    parser.add_argument(
        "--override", metavar="NAME[,NAME]", default=None,
        help="With --resume: let these settings differ from the run's config.json from the resumed step on "
             "(e.g. --override lr --lr 0.01); config.json records each change and its step. Without it a "
             "resumed run refuses flags that would change what it trains.",
    )
    return parser


def run(ns: argparse.Namespace) -> int:
    """Validate the flags, train, and map every known way a run ends to its exit status."""
    from resnet_scale.data import DataError
    from resnet_scale.tracking import TrackingError
    from resnet_scale.train import train

    # apply_* transforms and the planner say what they did through this logger (main process only).
    logging.basicConfig(format="resnet-scale: %(message)s", level=logging.WARNING)
    logging.getLogger("resnet_scale").setLevel(logging.INFO)
    from resnet_scale.train.checkpoint import EXIT_PREEMPTED, Preempted
    from resnet_scale.train.control import EXIT_NONFINITE, NonFiniteError
    from resnet_scale.train.oom import OutOfMemoryUnrecoverable

    try:
        cfg = config_from_args(ns).validate()
        train(cfg, given=given_fields(ns), overrides=parse_overrides(ns.override))
    except (ConfigError, DataError, TrackingError) as err:
        print(f"resnet-scale train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Preempted as stop:
        print(f"resnet-scale train: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except NonFiniteError as err:
        print(f"resnet-scale train: stopped: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except OutOfMemoryUnrecoverable as err:
        print(f"resnet-scale train: stopped: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        print(f"resnet-scale train: error: {err}. The run's files could not be written: free disk space or "
              "choose another --output-dir; the newest complete checkpoint is still valid (--resume auto).",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``resnet-scale train`` without the subcommand word (``launch/train.py``)."""
    return standalone(sys.modules[__name__], argv)
