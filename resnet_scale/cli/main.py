"""``resnet-scale COMMAND``: one module per subcommand (``train``, ``plan``, ``eval``, ``report``, ``zoo``),
each with ``NAME``, ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(ns) -> int``.

Bad input exits with status 2 and one message that says what was wrong and what to do.
"""

from __future__ import annotations

import sys

from resnet_scale._version import __version__
from resnet_scale.cli import eval as eval_cmd
from resnet_scale.cli import plan, report, train, zoo
from resnet_scale.cli.parser import Parser

SUBCOMMANDS = {module.NAME: module for module in (train, plan, eval_cmd, report, zoo)}


def build_parser() -> Parser:
    parser = Parser(prog="resnet-scale",
                    description="Train ResNets on CIFAR-10 and data like it; make them fit and go fast.")
    parser.add_argument("--version", action="version", version=f"resnet-scale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION))
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return SUBCOMMANDS[ns.command].run(ns)


if __name__ == "__main__":
    sys.exit(main())
