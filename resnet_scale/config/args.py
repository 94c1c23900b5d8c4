"""Command-line flags derived from the typed config (``schema.py``): nothing is listed twice.

Every field becomes one flag in its section's argument group, with its help text, default and
choices (from ``Literal``). Precedence: defaults < ``--config FILE`` < flags actually given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

from resnet_scale.config.checks import ALTERNATIVES
from resnet_scale.config.errors import ConfigError
from resnet_scale.config.files import load_config_file
from resnet_scale.config.schema import Config
from resnet_scale.config.values import coerce_value, field_type

#: Train settings a config file does not set: a file says how to train, the command line which run.
_NOT_FROM_FILES = ("run_name", "resume")


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def _argparse_type(cls: type, f: dataclasses.Field):
    def parse(text: str) -> Any:
        try:
            return coerce_value(cls, f, text, flag_name(f))
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None

    parse.__name__ = f.name  # argparse names the type in "invalid <name> value"
    return parse


def _show_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def plain_text(text: str) -> str:
    """Help text without reStructuredText markup: ``code`` and :role:`name` become the bare words."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


#: Metavars by value type, where a field names none (``metadata["metavar"]``).
_METAVARS = {int: "N", float: "X", str: "TEXT"}


class _DeprecatedFlag(argparse.Action):
    """An old name of a flag: stores like the flag, and says once (main process) what to use instead."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        noted = namespace.__dict__.setdefault("deprecated_flags", [])  # once per command, however often given
        if option_string not in noted:
            noted.append(option_string)
            if os.environ.get("RANK", "0") == "0":
                print(f"{parser.prog}: note: {option_string} is deprecated and will be removed in the next "
                      f"release; use {self.new} (same values).", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type = Config,
                         listed: Callable[[str], bool] | None = None) -> None:
    """One argument group per config section, one flag per field; defaults are SUPPRESSed so that
    only flags actually given override the config file. ``listed(section.field)`` False: the flag is
    accepted but left out of ``--help`` (``plan`` lists only what affects memory)."""
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help="YAML or JSON config (as saved in a run's config.json); flags given here win. A file never "
             "names the run or resumes it (its run_name and resume are not used): replaying a run's config.json "
             "starts a new run; --run-name and --resume say which run.",
    )
    defaults = config_cls()
    for section in dataclasses.fields(config_cls):
        sub = getattr(defaults, section.name)
        group = parser.add_argument_group(section.name, plain_text((type(sub).__doc__ or "").strip()))
        for f in dataclasses.fields(sub):
            tp, _ = field_type(type(sub), f.name)
            default = getattr(sub, f.name)
            kwargs: dict[str, Any] = {"dest": f"{section.name}.{f.name}", "default": argparse.SUPPRESS}
            help_text = plain_text(f.metadata.get("help", ""))
            if not re.search(r"\bdefault\b", help_text, re.IGNORECASE):  # a help text may say it in its own words
                help_text += f" (default: {_show_default(default)})"
            if tp is bool:  # --flag / --no-flag; an Optional[bool] stays None when neither is given
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _argparse_type(type(sub), f)
                if "metavar" in f.metadata:
                    kwargs["metavar"] = f.metadata["metavar"]
                elif get_origin(tp) is Literal:
                    kwargs["metavar"] = "{" + ",".join(get_args(tp)) + "}"
                elif get_origin(tp) is tuple:
                    kwargs["metavar"] = "N,N,..."
                else:
                    kwargs["metavar"] = _METAVARS[tp]
            hidden = listed is not None and not listed(f"{section.name}.{f.name}")
            aliases = ["--" + a.replace("_", "-") for a in f.metadata.get("aliases", ())]
            shown = argparse.SUPPRESS if hidden else help_text.replace("%", "%%")
            group.add_argument(flag_name(f), help=shown, **kwargs)
            for alias in aliases:
                group.add_argument(alias, action=_DeprecatedFlag, new=flag_name(f), **kwargs,
                                   help=argparse.SUPPRESS if hidden else
                                   f"Deprecated alias of {flag_name(f)}, removed in the next release.")


def config_from_args(ns: argparse.Namespace, config_cls: type = Config) -> Config:
    """Resolve the config: defaults, then ``--config FILE``, then the flags actually given."""
    cfg = load_config_file(ns.config) if getattr(ns, "config", None) else config_cls()
    if getattr(ns, "config", None):  # which run, and whether to continue it, is said on the command line
        unused = {name: getattr(cfg.train, name) for name in _NOT_FROM_FILES if getattr(cfg.train, name) is not None}
        if unused:
            logging.getLogger("resnet_scale").info(
                "--config %s: not using its %s (a config file says how to train; --run-name and --resume say "
                "which run)", ns.config, ", ".join(f"{k} {v!r}" for k, v in unused.items()))
        cfg.train = dataclasses.replace(cfg.train, **dict.fromkeys(_NOT_FROM_FILES))
    for key, value in vars(ns).items():
        if "." not in key:
            continue
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, value)
    return drop_alternatives(cfg, {key for key in vars(ns) if "." in key})


def drop_alternatives(cfg: Config, given: set[str] | frozenset[str]) -> Config:
    """A setting given here wins over its alternative set by a file (``--micro-batch-size`` over a
    config file's ``grad_accum_steps``): the alternative is unset, unless it was given here too."""
    for pair in ALTERNATIVES:
        for name in pair:
            for other in pair:
                if other != name and name in given and other not in given:
                    section, key = other.split(".", 1)
                    setattr(getattr(cfg, section), key, None)
    return cfg


def given_fields(ns: argparse.Namespace) -> frozenset[str]:
    """The settings the command asked for (``section.field``): flags given, and the keys of the
    ``--config`` file except those a file does not set. A resumed run compares them with its own."""
    given = {key for key in vars(ns) if "." in key}
    if getattr(ns, "config", None):
        raw = _read_mapping(Path(ns.config))
        if "config" in raw and isinstance(raw["config"], dict):
            raw = raw["config"]
        given |= {f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict)
                  for key in values if not (section == "train" and key in _NOT_FROM_FILES)}
    return frozenset(given)


def _read_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a config file that ``load_config_file`` has already accepted."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        raw = json.loads(text)
    return raw if isinstance(raw, dict) else {}


def config_to_argv(cfg: Config) -> list[str]:
    """The flags that reproduce ``cfg`` (fields equal to the default are left out)."""
    argv: list[str] = []
    defaults = type(cfg)()
    for section in dataclasses.fields(cfg):
        sub, base = getattr(cfg, section.name), getattr(defaults, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if value == getattr(base, f.name):
                continue
            tp, _ = field_type(type(sub), f.name)
            if tp is bool and value is not None:
                argv.append(flag_name(f) if value else "--no-" + flag_name(f)[2:])
            else:
                argv += [flag_name(f), _show_default(value)]
    return argv


__all__ = ["add_config_arguments", "config_from_args", "config_to_argv", "coerce_value", "drop_alternatives",
           "flag_name", "given_fields", "plain_text"]
