"""Command-line flags derived from the typed config (``schema.py``): nothing is listed twice.

Every field becomes one flag in its section's argument group, with its help text, default and
choices (from ``Literal``). Precedence: defaults < ``--config FILE`` < flags actually given.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal, get_args, get_origin

from resnet_scale.config.errors import ConfigError
from resnet_scale.config.schema import Config, load_config_file
from resnet_scale.config.values import coerce_value, field_type

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
        help="YAML or JSON config (as saved in a run's config.json); flags given here win.",
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
    for key, value in vars(ns).items():
        if "." not in key:
            continue
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, value)
    return cfg


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


__all__ = ["add_config_arguments", "config_from_args", "config_to_argv", "coerce_value", "flag_name"]
