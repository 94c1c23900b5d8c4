"""Command-line flags derived from the typed config (``schema.py``): nothing is listed twice.

Every field becomes one flag in its section's argument group, with its help text, default and
choices (from ``Literal``). Precedence: defaults < ``--config FILE`` < flags actually given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from resnet_scale.config.errors import ConfigError
from resnet_scale.config.schema import Config, load_config_file
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
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type = Config) -> None:
    """One argument group per config section, one flag per field; defaults are SUPPRESSed so that
    only flags actually given override the config file."""
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help="YAML or JSON config (as saved in a run's config.json); flags given here win. A file never "
             "names the run or resumes it (its run_name and resume are not used): replaying a run's config.json "
             "starts a new run; --run-name and --resume say which run.",
    )
    defaults = config_cls()
    for section in dataclasses.fields(config_cls):
        sub = getattr(defaults, section.name)
        group = parser.add_argument_group(section.name, (type(sub).__doc__ or "").strip())
        for f in dataclasses.fields(sub):
            tp, _ = field_type(type(sub), f.name)
            default = getattr(sub, f.name)
            kwargs: dict[str, Any] = {"dest": f"{section.name}.{f.name}", "default": argparse.SUPPRESS}
            help_text = f"{f.metadata.get('help', '')} (default: {_show_default(default)})"
            if tp is bool:  # --flag / --no-flag; an Optional[bool] stays None when neither is given
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _argparse_type(type(sub), f)
                if get_origin(tp) is Literal:
                    kwargs["metavar"] = "{" + ",".join(get_args(tp)) + "}"
                elif get_origin(tp) is tuple:
                    kwargs["metavar"] = "N,N,..."
                else:
                    kwargs["metavar"] = tp.__name__.upper()
            group.add_argument(flag_name(f), help=help_text.replace("%", "%%"), **kwargs)


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


__all__ = ["add_config_arguments", "config_from_args", "config_to_argv", "coerce_value", "flag_name", "given_fields"]
