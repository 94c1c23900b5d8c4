"""Command-line flags derived from the typed config (``config.py``): nothing is listed twice.

Every field becomes one flag in its section's argument group, with its help text, default and
choices (from ``Literal``). Precedence: defaults < ``--config FILE`` < flags actually given.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from resnet_scale.config import Config, ConfigError, load_config_file

_NONE_WORDS = ("none", "null", "")


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_scalar(tp: Any, text: Any, where: str) -> Any:
    """Parse one value of type ``tp`` from a CLI string or a config-file value."""
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if text not in choices:
            raise ConfigError(f"{where}: invalid choice {text!r}; valid values: {', '.join(map(str, choices))}.")
        return text
    if get_origin(tp) is tuple:
        (item,) = [a for a in get_args(tp) if a is not Ellipsis][:1]
        parts = text.split(",") if isinstance(text, str) else list(text)
        try:
            return tuple(item(str(p).strip()) for p in parts if str(p).strip() != "")
        except ValueError:
            raise ConfigError(f"{where}: expected comma-separated {item.__name__}s like 3,4,6,3, got {text!r}.") from None
    if tp is bool:
        if isinstance(text, bool):
            return text
        low = str(text).lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {text!r}.")
    if tp in (int, float):
        if isinstance(text, bool):
            raise ConfigError(f"{where}: expected a number, got {text!r}.")
        try:
            value = tp(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {'an integer' if tp is int else 'a number'}, got {text!r}.") from None
        if tp is int and isinstance(text, float) and text != value:
            raise ConfigError(f"{where}: expected an integer, got {text!r}.")
        return value
    if tp is str:
        return str(text)
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def coerce_value(cls: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    tp, optional = _unwrap_optional(_field_types(cls)[f.name])
    if optional and value is None:
        return None
    # "none" unsets a number or a choice (--max-steps none); for a free string it is the string
    # itself (--checkpointing none is a policy, not "unset").
    if optional and tp is not str and isinstance(value, str) and value.lower() in _NONE_WORDS:
        return None
    return _parse_scalar(tp, value, where)


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
            tp, _ = _unwrap_optional(_field_types(type(sub))[f.name])
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
            tp, _ = _unwrap_optional(_field_types(type(sub))[f.name])
            if tp is bool and value is not None:
                argv.append(flag_name(f) if value else "--no-" + flag_name(f)[2:])
            else:
                argv += [flag_name(f), _show_default(value)]
    return argv


__all__ = ["add_config_arguments", "config_from_args", "config_to_argv", "coerce_value", "flag_name"]
