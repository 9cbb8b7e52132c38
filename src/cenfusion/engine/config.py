"""Run configuration: frozen dataclasses filled from defaults, an optional YAML file and flags.

Every setting is defined once, as a dataclass field made by :func:`setting` (default, help
text, choices, released flag spellings as aliases). The command-line flags are generated from
those fields by :func:`add_config_flags`, YAML files use the same names, and every value is
type-checked so that a typo is one clear error, not a silent default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cenfusion.errors import CenError

C = TypeVar("C")

#: The default of a setting that must be given (a positional argument).
REQUIRED: Any = dataclasses.MISSING


def setting(
    default: Any,
    help: str,
    *,
    aliases: tuple[str, ...] = (),
    choices: tuple[Any, ...] | None = None,
    metavar: str | tuple[str, ...] | None = None,
    positional: bool = False,
    repeatable: bool = False,
    bare: Any = None,
) -> Any:
    """A setting with its help text, its allowed values and its alias flags.

    ``aliases`` are extra option strings (the released code's spellings, e.g. ``-t``); the
    field's own flag is ``--name-with-dashes``, or the bare name with ``positional``; a
    ``default`` of :data:`REQUIRED` makes the argument required.
    ``repeatable``: the flag may be given again, adding values; ``bare``: the value of the
    flag given without one.
    """
    meta = {
        "help": help,
        "aliases": aliases,
        "choices": choices,
        "metavar": metavar,
        "positional": positional,
        "repeatable": repeatable,
        "bare": bare,
    }
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _flag_type(annotation: Any) -> tuple[Any, int | str | None]:
    """(element type, argparse ``nargs``) of a field annotation; ``X | None`` reads as ``X``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        # several types (``int | str``): the flag takes text, which the dataclass reads
        return _flag_type(inner[0]) if len(inner) == 1 else (str, None)
    if origin is tuple:
        items = typing.get_args(annotation)
        return _flag_type(items[0])[0], "+" if items[-1] is Ellipsis else len(items)
    return annotation, None


_EXPLICIT_NONE = "<none>"


def _path(text: str) -> Path:
    """A path flag's value; an empty one (an unset shell variable) would mean the current
    folder."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return Path(text)


def _ascii(kind: type) -> Any:
    """``kind`` read from ASCII text without ``_``: Python's ``int("３")`` is 3 and
    ``int("1_0")`` 10, which no flag means (and settings files refuse)."""

    def parse(text: str) -> Any:
        if not text.isascii() or "_" in text:
            raise ValueError(text)
        return kind(text)

    parse.__name__ = kind.__name__  # argparse says "invalid int value: '３'"
    return parse


_PARSERS: dict[Any, Any] = {Path: _path, int: _ascii(int), float: _ascii(float)}


def _none_or(kind: Any) -> Any:
    def parse(text: str) -> Any:
        return _EXPLICIT_NONE if text.lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


#: The attribute of every argparse action made from a setting: ``(class, field name)``.
SETTING_OF_ACTION = "cenfusion_setting"


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose commands take their positionals anywhere among their flags
    (``cen seg predict CKPT -o OUT FOLDER``): plain argparse reads a trailing optional
    positional only right after the one before it, and calls a later one unrecognised.
    Subcommand parsers are made of the parser's own class, so the root parser's class
    reaches every command."""

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        commands = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        if commands or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None
) -> None:
    """One flag per field of ``cls`` (or of ``only``), default ``None`` meaning "not given".

    Booleans get ``--x/--no-x``; tuples take one or more values (or exactly as many as the
    tuple type has); optional fields accept ``none``. The help text shows the default.
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if only is not None and field.name not in only or "help" not in field.metadata:
            continue
        meta = field.metadata
        kind, nargs = _flag_type(hints[field.name])
        options: dict[str, Any] = {"help": _help(meta["help"], field.default)}
        if meta["positional"]:
            names: tuple[str, ...] = (field.name,)
            if field.default is not dataclasses.MISSING:
                nargs = "*" if nargs == "+" else "?" if nargs is None else nargs
        else:
            names = (flag_name(field.name), *meta["aliases"])
            options.update(dest=field.name, default=None, required=field.default is REQUIRED)
        if kind is bool:
            action = parser.add_argument(*names, action=argparse.BooleanOptionalAction, **options)
        else:
            optional = type(None) in typing.get_args(hints[field.name])
            if meta["repeatable"]:
                options["action"] = "extend"
            if meta["bare"] is not None:
                nargs, options["const"] = "?", meta["bare"]
            parse = _PARSERS.get(kind, kind)
            action = parser.add_argument(
                *names,
                type=_none_or(parse) if optional else parse,
                nargs=nargs,
                choices=meta["choices"],
                metavar=meta["metavar"]
                or (None if meta["choices"] or meta["positional"] else _METAVARS.get(kind)),
                **options,
            )
        setattr(action, SETTING_OF_ACTION, (cls, field.name))


_METAVARS = {int: "N", float: "X", str: "TEXT", Path: "PATH"}


def _help(text: str, default: Any) -> str:
    """The field's help with its default, as the flag's reader needs it."""
    if default is None or default == () or default is REQUIRED:
        return text
    if isinstance(default, bool):
        return f"{text} (default: {'on' if default else 'off'})"
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})"


def given_flags(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line (``none`` gives None)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if value is not None:
            out[field.name] = None if value == _EXPLICIT_NONE else value
    return out


def options_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """``cls`` (a command's options) from its flags; a flag not given keeps its default.

    Raises:
        CenError: a non-finite number, which argparse's ``float`` accepts (``nan``, ``inf``).
    """
    given = given_flags(cls, args)
    options = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    check_finite(options)
    return options


def check_finite(config: Any) -> None:
    """Refuse ``nan`` and ``inf`` in every number of ``config`` (a dataclass of settings):
    argparse and YAML read them as floats, no setting means them, and they pass every range
    check (``nan < 0`` is false), to fail at the first step or silently change a run."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise CenError(f"{flag_name(field.name)} {item}: expected a finite number")


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


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
        if isinstance(value, dict):
            raise CenError(f"{where}: expected a list, got {value!r}")
        if not isinstance(value, (list, tuple)):
            value = [value]  # one value, as a flag takes it
        item = args[0] if args else Any
        return tuple(_coerce(v, item, where) for v in value)
    if annotation is Any:
        return value
    if annotation is Path:
        if not isinstance(value, (str, Path)) or value == "":
            raise CenError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _EXPONENT.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
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
    """``config`` with ``updates`` applied, checked like a YAML file."""
    return config_from_dict(type(config), {**config_to_dict(config), **updates}, where)


class _SettingsLoader(yaml.SafeLoader):
    """YAML as settings are written: a key given twice, or a number that YAML 1.1 reads
    otherwise than it looks (``010`` is 8, ``1:30`` is 90, ``0x10``, ``1_0``), is refused
    rather than silently taken."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *base`` brings keys in, to be overridden
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue
            if key in seen:
                raise CenError(f"line {key_node.start_mark.line + 1}: {key} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = super().construct_yaml_int(node)
        return _as_written(node, value, _PLAIN_INT.fullmatch(node.value) is not None)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        value = super().construct_yaml_float(node)
        return _as_written(node, value, "_" not in node.value and ":" not in node.value)


def _as_written(node: yaml.ScalarNode, value: Any, plain: bool) -> Any:
    """``value`` if its text is a plain number, else a refusal naming the line."""
    if not plain:
        raise CenError(
            f"line {node.start_mark.line + 1}: {node.value!r} reads as {value} in YAML; write "
            "the decimal number, or quote it for text"
        )
    return value


_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_SettingsLoader.add_constructor("tag:yaml.org,2002:int", _SettingsLoader.construct_yaml_int)
_SettingsLoader.add_constructor("tag:yaml.org,2002:float", _SettingsLoader.construct_yaml_float)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise CenError(f"--config {path}: a folder, expected a YAML file of settings")
    if not path.exists():
        raise CenError(f"--config {path}: file not found")
    if not path.is_file():
        raise CenError(f"--config {path}: not a regular file, expected a YAML file of settings")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SettingsLoader) or {}
    except CenError as err:
        raise CenError(f"--config {path}: {err}") from None
    except UnicodeDecodeError as err:
        raise CenError(
            f"--config {path}: not UTF-8 text (byte {err.start}), expected a YAML file"
        ) from err
    except yaml.YAMLError as err:
        raise CenError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise CenError(f"--config {path}: expected a mapping of settings")
    return data


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
