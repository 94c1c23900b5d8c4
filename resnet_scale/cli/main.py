"""``resnet-scale COMMAND``: one module per subcommand (``train``, ``plan``, ``eval``, ``report``, ``zoo``),
each with ``NAME``, ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(ns) -> int``.

Bad input exits with status 2 and one message that says what was wrong and what to do.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from resnet_scale._version import __version__
from resnet_scale.cli import eval as eval_cmd
from resnet_scale.cli import plan, report, train, zoo
from resnet_scale.cli.parser import Parser

SUBCOMMANDS = {module.NAME: module for module in (train, plan, eval_cmd, report, zoo)}


class _Version(argparse.Action):
    """``--version``, as pip words it: the version and which copy of the package answers (a checkout
    or an installed wheel), on one line (argparse's own version action wraps long paths)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        here = Path(__file__).resolve().parents[1]
        print(f"resnet-scale {__version__} from {here} (python {platform.python_version()})")
        parser.exit()


def build_parser() -> Parser:
    parser = Parser(prog="resnet-scale",
                    description="Train ResNets on CIFAR-10 and data like it; make them fit and go fast.")
    parser.add_argument("--version", action=_Version, help="print the version and where the package is, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION))
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return SUBCOMMANDS[ns.command].run(ns)


if __name__ == "__main__":
    sys.exit(main())
