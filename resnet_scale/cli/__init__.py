"""The command line, ``resnet-scale``: a thin ``main`` (``main.py``) over one module per
subcommand (``train``, ``plan``, ``eval``, ``report``, ``zoo``). Each module imports what its command needs
when it runs, so ``resnet-scale --help`` stays fast."""

from resnet_scale.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
