"""Reading one config value, typed by its dataclass field: from a flag's text or a config file's
value. ``--max-steps none`` unsets an optional number; a wrong type is a ConfigError that names
the flag or key and what was expected."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from resnet_scale.config.errors import ConfigError

_NONE_WORDS = ("none", "null", "")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def field_type(cls: type, name: str) -> tuple[Any, bool]:
    """(the type of field ``name`` of dataclass ``cls``, whether it is Optional)."""
    return _unwrap_optional(typing.get_type_hints(cls)[name])


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
    tp, optional = field_type(cls, f.name)
    if optional and value is None:
        return None
    # "none" unsets a number or a choice (--max-steps none); for a free string it is the string
    # itself (--checkpointing none is a policy, not "unset").
    if optional and tp is not str and isinstance(value, str) and value.lower() in _NONE_WORDS:
        return None
    return _parse_scalar(tp, value, where)
