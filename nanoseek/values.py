"""Reading a setting's value: the one reader of every setting, from a TOML file, a --set string or a
command-line knob. A leaf module (standard library only), so `nanoseek.tasks` can read its knobs with it
without importing the settings tree (and with it the model and torch)."""

from __future__ import annotations

import tomllib
import types
import typing
from typing import Any

_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def parse_value(value: Any, kind: Any, where: str) -> Any:
    """`value` as the type `kind`, or a ValueError naming `where`: the one reader of every setting.

    A string (a --set value, a command-line knob) is read as a TOML value (numbers, true/false,
    [lists], {tables}, "quoted strings") or else kept as a bare string; lists and tuples also take
    "a,b,c". Values read from a TOML file are checked (ints widen to floats)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # X | None
        (kind,) = [a for a in args if a is not type(None)]
        return None if value is None else parse_value(value, kind, where)
    text = value if isinstance(value, str) else None
    if text is not None:
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            pass  # a bare string

    def bad(expected: str) -> ValueError:
        return ValueError(f"{where}: expected {expected}, got {text if text is not None else value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _BOOLEANS:
            return _BOOLEANS[text.lower()]
        raise bad("true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if kind is str:
        if isinstance(value, str):
            return value
        if text is not None:
            return text
        raise bad("a string")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            raise bad("a list")
        return origin(parse_value(item, args[0] if args else Any, where) for item in value)
    if origin is dict and not isinstance(value, dict):
        raise bad("a table")
    return value
