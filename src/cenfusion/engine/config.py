"""Run configuration: frozen dataclasses filled from defaults, an optional YAML file and flags.

A task defines its own dataclass; these helpers turn it into YAML and back, with a check of
every key and value type so that a typo in a YAML file is one clear error, not a silent default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cenfusion.errors import CenError

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config dataclass (tuples become lists, paths strings)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except CenError as err:
                errors.append(str(err))
        raise CenError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise CenError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, where) for v in value)
    if annotation is Any:
        return value
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise CenError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    raise CenError(
        f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}"
    )


def config_from_dict(cls: type[C], values: dict[str, Any], where: str = "config") -> C:
    """Build ``cls`` from ``values``; unknown keys and wrong types raise :class:`CenError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CenError(f"{where}: unknown setting {unknown[0]!r}")
    kwargs = {k: _coerce(v, hints[k], f"{where}: {k}") for k, v in values.items()}
    return cls(**kwargs)


def replace_config(config: C, updates: dict[str, Any], where: str = "flags") -> C:
    """``config`` with ``updates`` (``None`` values ignored), checked like a YAML file."""
    merged = {**config_to_dict(config), **{k: v for k, v in updates.items() if v is not None}}
    return config_from_dict(type(config), merged, where)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CenError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CenError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise CenError(f"--config {path}: expected a mapping of settings")
    return data


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
