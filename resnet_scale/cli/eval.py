"""``resnet-scale eval RUN``: evaluate a run's saved weights on the test split.

    resnet-scale eval runs/my-run [--weights final|best] [--data SOURCE] [--data-dir PATH] [--device cpu]

Builds the run's model from its config.json, loads ``model.safetensors`` (``--weights final``, the
default) or ``model_best.safetensors`` (``--weights best``), and evaluates it on the test split,
prepared as the run's own test loader prepared it. Prints the loss and accuracy and writes them, with
the confusion matrix (rows: true class, columns: predicted class), to ``RUN/eval-<weights>.json``.
Nothing the run wrote is changed.

Exit status: 0 done; 1 the result could not be written; 2 bad input (no such run, no such weights,
data that does not match the run's).
"""

from __future__ import annotations

import argparse
import sys

from resnet_scale.cli.parser import EXIT_BAD_INPUT, standalone
from resnet_scale.config import DEVICES, SOURCES, ConfigError

NAME = "eval"
HELP = "evaluate a run's final or best weights on the test split (loss, accuracy, confusion matrix)"
DESCRIPTION = ("Evaluate a run's saved weights on the test split of its data, prepared as in training. Prints "
               "the test loss and accuracy and writes them, with a confusion matrix, to RUN/eval-WEIGHTS.json.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run", metavar="RUN", help="The run's folder, <output-dir>/<run-name> (it holds config.json).")
    parser.add_argument("--weights", choices=("final", "best"), default="final",
                        help="model.safetensors (final: written when the run finished) or model_best.safetensors "
                             "(best: the weights of the best test accuracy so far) (default: final).")
    parser.add_argument("--data", choices=SOURCES, default=None, metavar="{" + ",".join(SOURCES) + "}",
                        help="The data to evaluate on (default: the run's). Only the run's own source, or an "
                             "imagefolder copy of its data with the same classes, matches the model.")
    parser.add_argument("--data-dir", default=None, metavar="PATH",
                        help="Where that data is (default: the run's --data-dir), e.g. when the run's folder moved "
                             "to another machine.")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="Device to evaluate on; auto uses the GPU when there is one (default: auto).")
    return parser


def run(ns: argparse.Namespace) -> int:
    from resnet_scale.data import DataError
    from resnet_scale.train.evaluation import evaluate_run

    try:
        result = evaluate_run(ns.run, weights=ns.weights, source=ns.data, data_dir=ns.data_dir, device=ns.device)
    except (ConfigError, DataError) as err:
        print(f"resnet-scale eval: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        print(f"resnet-scale eval: error: cannot write the result ({err.strerror or err}: {err.filename}); nothing "
              "else was changed. Make the run folder writable.", file=sys.stderr)
        return 1
    at = f" (step {result['step']}, epoch {result['epoch']})" if "step" in result and "epoch" in result else ""
    print(f"resnet-scale eval: {result['run']} {result['weights']} weights{at} on {result['data']} test split: "
          f"loss {result['loss']:.4f}, accuracy {result['accuracy']:.2%} ({result['samples']} images) "
          f"-> {result['written']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``resnet-scale eval`` without the subcommand word (``python -m resnet_scale.cli.eval``)."""
    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
