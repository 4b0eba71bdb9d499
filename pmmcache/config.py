"""Typed configuration: frozen dataclasses that load from dicts/files strictly and save as JSON.

Every stage has its own frozen dataclass. `from_dict` rejects unknown keys and wrong types with a
message naming the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pmmcache.errors import ConfigError

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass; paths become strings."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} does not match {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_hint = args[0] if args else Any
        items = [_coerce(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of settings, got {value!r}")
        return from_dict(hint, value, where=where)
    if hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build config `cls` from `data`; unknown keys and wrong types raise ConfigError naming them.

    A class may list `MOVED_SETTINGS` (old key -> dotted new name): such a key is refused naming where
    it went. A class may define `check_given(data)` to refuse settings that conflict when given together
    (a default cannot be told from an explicit value after construction)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    moved = [key for key in unknown if key in getattr(cls, "MOVED_SETTINGS", {})]  # renamed since configs were saved
    if moved:
        prefix = f"{where}." if where else ""
        raise ConfigError("; ".join(f"setting {prefix}{key} is now {prefix}{cls.MOVED_SETTINGS[key]}" for key in moved)
                          + f" ({cls.__name__}): set it there instead")
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(repr(u) for u in unknown)} for {cls.__name__}"
            f"{' in ' + where if where else ''}; known: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    check_given = getattr(cls, "check_given", None)
    if check_given is not None:
        check_given(kwargs)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{cls.__name__}: {err}") from err


def replace(config: T, **overrides: Any) -> T:
    """`dataclasses.replace` with the same strict checking as `from_dict`; None values are skipped."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    merged = {**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, **overrides}
    return from_dict(type(config), merged)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON settings file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: config files must be .toml, .yaml/.yml or .json")
    except ConfigError:
        raise
    except Exception as err:  # parse errors from three libraries; re-raised with the file named
        raise ConfigError(f"{path}: cannot parse: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    return data
