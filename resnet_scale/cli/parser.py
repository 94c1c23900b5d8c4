"""The argument parser every subcommand uses, and the one-line error convention of the CLI."""

from __future__ import annotations

import argparse
import difflib

#: Exit status of every refusal of bad input (a flag, a value, a file): one message, no traceback.
EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
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

    def error(self, message: str):
        """ONE line and exit status 2: argparse would print the whole usage block first, which buries
        the line that says what was wrong (``--help`` shows the usage)."""
        if "--help" not in message:
            message = f"{message.rstrip('. ')}; see {self.prog} --help for the flags"
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def standalone(module, argv: list[str] | None = None) -> int:
    """Run one subcommand module (``add_arguments`` + ``run``) without the ``resnet-scale`` front:
    ``launch/train.py`` and ``python -m resnet_scale.cli.plan`` use it."""
    parser = Parser(prog=f"resnet-scale {module.NAME}", description=module.DESCRIPTION)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))
