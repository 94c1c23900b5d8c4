"""Reading one config value, typed by its dataclass field: from a flag's text or a config file's
value. ``--max-steps none`` unsets an optional number; a wrong type is a ConfigError that names
the flag or key and what was expected.

Every number is checked here, for every field alike: a float must be finite (``nan``, ``inf``,
or a number too large for a float are refused; an optional setting is turned off with ``none``,
never with ``inf`` or ``0``) and an int must fit in 64 bits (torch and numpy take nothing wider).
The ranges each field allows are ``checks.py``'s."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from resnet_scale.config.errors import ConfigError

_NONE_WORDS = ("none", "null", "")
#: The widest int torch and numpy take (int64).
INT_MAX = 2**63 - 1


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def field_type(cls: type, name: str) -> tuple[Any, bool]:
    """(the type of field ``name`` of dataclass ``cls``, whether it is Optional)."""
    return _unwrap_optional(typing.get_type_hints(cls)[name])


def _parse_scalar(tp: Any, text: Any, where: str, optional: bool = False) -> Any:
    """Parse one value of type ``tp`` from a CLI string or a config-file value."""
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if text not in choices:
            raise ConfigError(f"{where}: invalid choice {text!r}; valid values: {', '.join(map(str, choices))}.")
        return text
    if get_origin(tp) is tuple:
        (item,) = [a for a in get_args(tp) if a is not Ellipsis][:1]
        expected = f"{where}: expected comma-separated {item.__name__}s like 3,4,6,3, got {text!r}."
        if not isinstance(text, (str, list, tuple)):
            raise ConfigError(expected)
        parts = text.split(",") if isinstance(text, str) else list(text)
        if any(isinstance(p, (list, tuple, dict, bool)) for p in parts):
            raise ConfigError(expected)
        items = [str(p).strip() for p in parts if str(p).strip() != ""]
        if item is int and not all(p.lstrip("+-").isdigit() for p in items):
            raise ConfigError(expected)
        return tuple(_parse_scalar(item, p, where) for p in items)  # an int beyond 64 bits is refused there
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
        return _parse_number(tp, text, where, optional)
    if tp is str:
        if not isinstance(text, (str, int, float)) or isinstance(text, bool):
            hint = " (YAML reads yes/no/on/off as true/false: quote the value)" if isinstance(text, bool) else ""
            raise ConfigError(f"{where}: expected a string, got {text!r}{hint}.")
        return str(text)
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _parse_number(tp: type, text: Any, where: str, optional: bool) -> int | float:
    """An int, or a finite float, from a flag's text or a file's value. Bools, ``nan``/``inf``
    (and numbers too large for a float) and ints wider than 64 bits are refused."""
    kind = "an integer" if tp is int else "a number"
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ConfigError(f"{where}: expected {kind}, got {_shown(text)}.")
    try:
        value = tp(text)
    except OverflowError:  # int(inf), or float() of an int with hundreds of digits
        value = math.inf
    except ValueError:
        value = None
    if value is None and tp is int and isinstance(text, str):
        try:  # int("inf") and int("nan") fail like int("abc"): say that they are not finite instead
            value = math.inf if not math.isfinite(float(text)) else None
        except ValueError:
            pass
    if value is None or tp is int and isinstance(text, float) and math.isfinite(text) and text != int(text):
        raise ConfigError(f"{where}: expected {kind}, got {_shown(text)}.")
    if not math.isfinite(value):
        off = ", or leave it out (or give none) to turn it off" if optional else ""
        raise ConfigError(f"{where}: {_shown(text)} is not a usable number (nan, infinite, or beyond a "
                          f"float's range); give a finite one{off}.")
    if tp is int and not -INT_MAX <= value <= INT_MAX:
        raise ConfigError(f"{where}: {_shown(text)} is out of range: integers here must fit in 64 bits "
                          f"(at most {INT_MAX:,}), and a sensible value is far smaller.")
    return value


def _shown(value: Any) -> str:
    """``repr(value)``, shortened when it is long (an int with hundreds of digits)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:24]}... ({len(text)} characters)"


def coerce_value(cls: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    tp, optional = field_type(cls, f.name)
    if f.metadata.get("comma_list") and isinstance(value, (list, tuple)):  # a file's list: wandb, tensorboard
        value = ",".join(map(str, value))
    if optional and value is None:
        return None
    # "none" unsets a number or a choice (--max-steps none); for a free string it is the string
    # itself (--activation-checkpointing none is a policy, not "unset").
    if optional and tp is not str and isinstance(value, str) and value.lower() in _NONE_WORDS:
        return None
    return _parse_scalar(tp, value, where, optional)


#: The trackers --tracker names (besides 'auto' and 'none').
TRACKER_KINDS = ("wandb", "tensorboard")


def split_trackers(value: Any) -> tuple[str, ...]:
    """``--tracker`` as a tuple of kinds: ``"wandb,tensorboard"`` or a list of names; ``none`` is ();
    ``auto`` stands alone. Duplicates are dropped. Anything else is a ConfigError that says what is valid."""
    words = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if words is None or not all(isinstance(w, str) for w in words):
        raise ConfigError(f"--tracker {value!r}: expected comma-separated names like wandb,tensorboard.")
    kinds = tuple(dict.fromkeys(w.strip().lower() for w in words if w.strip()))
    valid = ", ".join(("auto", *TRACKER_KINDS, "none"))
    for kind in kinds:
        if kind not in (*TRACKER_KINDS, "auto", "none"):
            raise ConfigError(f"--tracker {kind!r} is not one of {valid} (several: --tracker wandb,tensorboard).")
    if len(kinds) > 1 and ({"auto", "none"} & set(kinds)):
        raise ConfigError(f"--tracker {','.join(kinds)}: 'auto' and 'none' stand alone; name the trackers, "
                          "e.g. --tracker wandb,tensorboard.")
    return () if kinds in ((), ("none",)) else kinds
