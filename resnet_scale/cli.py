"""``resnet-scale``: the command line. ``train`` now; ``plan``, ``report`` and ``bench`` come with
the memory-planner, tracking and benchmark work.

Bad input exits with status 2 and one message that says what was wrong and what to do.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import sys

from resnet_scale.config import ConfigError
from resnet_scale.config_args import add_config_arguments, config_from_args

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, except that the (sub)command that gets an unknown flag refuses it at once, naming the
    closest known flag: ``resnet-scale train: error: unrecognized arguments: --bach-size 64 (did you
    mean --batch-size?); see ...``. So parse_known_args never returns leftovers here."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        if extra:
            flags = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            close = [m for arg in extra if arg.startswith("--")
                     for m in difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1, cutoff=0.75)]
            hint = f" (did you mean {', '.join(dict.fromkeys(close))}?)" if close else ""
            self.error(f"unrecognized arguments: {' '.join(extra)}{hint}; see {self.prog} --help for the flags")
        return ns, extra


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_config_arguments(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="resnet-scale",
        description="Train ResNets on CIFAR-10 and data like it; make them fit and go fast.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _train_parser(sub.add_parser(
        "train", help="train a ResNet (one process, or many under accelerate launch / torchrun)",
        description="Train a ResNet. --batch-size is the global batch over all processes.",
    ))
    from resnet_scale.plan_cli import add_plan_arguments

    add_plan_arguments(sub.add_parser(
        "plan", help="predict peak GPU memory and find the fastest settings that fit --max-memory",
        description="Predict peak memory per device for the given training flags and print the fastest "
        "plan that fits --max-memory, as the exact flags to add. Exit status: 0 fits or a plan was found, "
        "2 bad input, 3 nothing fits.",
    ))
    from resnet_scale.report_cli import add_report_arguments

    add_report_arguments(sub.add_parser(
        "report", help="compare run folders: plots and mean +- std tables (report.html, report.md)",
        description="Build a comparison report from local run folders (or output folders holding runs).",
    ))
    sub.add_parser("zoo", help="print the table of blocks x depths: weighted layers and parameters")
    return parser


def _run_train(ns: argparse.Namespace) -> int:
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
        train(cfg)
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


def _run_zoo() -> int:
    from resnet_scale.models import zoo_table

    print("| block | depth | stages | weighted layers | parameters (10 classes) |")
    print("|---|---|---|---|---|")
    for row in zoo_table(num_classes=10, stem="imagenet"):
        layers = ",".join(map(str, row["layers"]))
        print(f"| {row['block']} | {row['depth']} | {layers} | {row['weighted_layers']} | {row['parameters'] / 1e6:.2f}M |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "train":
        return _run_train(ns)
    if ns.command == "plan":
        from resnet_scale.plan_cli import run_plan

        return run_plan(ns)
    if ns.command == "report":
        from resnet_scale.report_cli import run_report

        return run_report(ns)
    if ns.command == "zoo":
        return _run_zoo()
    raise AssertionError(ns.command)


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of ``launch/train.py``: the flags of ``resnet-scale train`` without the subcommand."""
    parser = _train_parser(_Parser(prog="launch/train.py", description="Train a ResNet."))
    return _run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
