"""Run configuration in and out: TOML tables and files, the one `--set path=value` syntax, and the TOML writer.

The layers (stage defaults < --config FILE.toml < --set ...) are applied here onto the dataclasses of
`nanoseek.config`; `RunConfig.check` then names the first bad value.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any

from nanoseek.config import RunConfig, parse_value
from nanoseek.errors import InputError, reading, unknown
from nanoseek.model.config import ModelConfig


def _field_type(obj: Any, name: str, where: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        raise InputError(f"{where}: " + str(unknown("setting", name, [f.name for f in dataclasses.fields(obj)])))
    return hints[name]


def _model_value(name: str, value: Any, where: str) -> Any:
    """A [model] override, typed by its ModelConfig field (the preset checks the value)."""
    hints = typing.get_type_hints(ModelConfig)
    if name not in hints:
        raise InputError(f"{where}: " + str(unknown("ModelConfig field", name, list(hints))))
    return parse_value(value, hints[name], where)


def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    """Set dataclass fields from a (TOML) table, recursing into the sections; unknown keys fail."""
    for key, value in values.items():
        name = f"{where}{key}"
        kind = _field_type(obj, key, name)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) or (key == "model" and isinstance(obj, RunConfig)):
            if not isinstance(value, dict):
                raise InputError(f"{name}: expected a table")
            if isinstance(current, dict):
                current.update({k: _model_value(k, v, f"model.{k}") for k, v in value.items()})
            else:
                _apply(current, value, f"{name}.")
        else:
            setattr(obj, key, parse_value(value, kind, name))


def split_override(item: str, syntax: str = "section.field=value") -> tuple[list[str], str]:
    """'a.b.c=value' -> (['a', 'b', 'c'], 'value'): the one --set syntax, a dotted path and a value."""
    dotted, sep, value = item.partition("=")
    path = [part.strip() for part in dotted.split(".")]
    if not sep or not all(path):
        raise InputError(f"--set {item!r}: expected {syntax}")
    return path, value.strip()


def apply_override(cfg: RunConfig, item: str) -> None:
    """--set section.field=value (model.field=value: a ModelConfig field; field=value: a top-level one)."""
    path, value = split_override(item)
    *sections, name = path
    where = "--set " + ".".join(path)
    if sections == ["model"]:
        cfg.model[name] = _model_value(name, value, where)
        return
    obj: Any = cfg
    for section in sections:
        if not dataclasses.is_dataclass(getattr(obj, section, None)):
            sections_known = [f.name for f in dataclasses.fields(obj) if dataclasses.is_dataclass(getattr(obj, f.name))]
            raise InputError(f"{where}: " + str(unknown("section", section, [*sections_known, "model"])))
        obj = getattr(obj, section)
    setattr(obj, name, parse_value(value, _field_type(obj, name, where), where))


def load_run_config(
    base: RunConfig | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
    where: str = "",
) -> RunConfig:
    """Defaults (`base`) < `values` (an already-parsed TOML table, named `where` in errors) < file < overrides."""
    cfg = base or RunConfig()
    if values:
        try:
            _apply(cfg, values, "")
        except ValueError as e:
            raise InputError(f"{where}{e}") from None
    if config_file:
        path = Path(config_file)
        try:
            with reading(path):
                values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"{path}: {e}") from None
        try:
            _apply(cfg, values, "")
        except ValueError as e:
            raise InputError(f"{path}: {e}") from None
    for item in overrides or []:
        apply_override(cfg, item)
    cfg.check()  # now, not after data loading
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(sections: dict[str, Any]) -> str:
    """A minimal TOML writer for flat tables of scalars/lists/inline dicts (None values are left out)."""
    top = [f"{k} = {_toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict) and v is not None]
    lines = [*top, ""] if top else []
    for name, table in sections.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
            lines.append("")
    return "\n".join(lines)


def run_config_to_toml(cfg: RunConfig) -> str:
    return dump_toml(dataclasses.asdict(cfg))
