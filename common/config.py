"""Dataclass configs from a YAML file plus command-line overrides, on transformers' ``HfArgumentParser``.

``--help`` lists every field with its type, default and help text; ``--config FILE.yaml`` supplies new
defaults and any field given on the command line wins. File values are checked against the field
types here (`coerce`; argparse checks command-line values); each dataclass checks its value ranges
in ``__post_init__`` with `require`. How a file's keys map to fields is the caller's
(`flat_values` here for a single dataclass; `llmrec.config` nests them by component).
"""

from __future__ import annotations

import argparse
import dataclasses
import types as pytypes
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from common.errors import UserError, shown


class ConfigError(UserError):
    """A configuration file or value that cannot be used; ``field`` names the field when there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def require(condition: bool, name: str, value: Any, requirement: str) -> None:
    """Raise a :class:`ConfigError` for field ``name`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"field {name!r} {requirement}, got {shown(value)}", field=name)


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` (from YAML) as a value of the field type ``annotation``, or a ConfigError.

    ints become floats where a float is wanted and numeric strings (YAML reads ``1e-3`` as a string)
    become numbers; anything else must already have the right type. Types it does not know pass.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, pytypes.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, name)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        require(value in args, name, value, f"must be one of {list(args)}")
        return value
    if origin is list:
        require(isinstance(value, list), name, value, "must be a list")
        return [coerce(item, args[0], name) for item in value] if args else value
    if annotation is bool:
        require(isinstance(value, bool), name, value, "must be true or false")
    elif annotation in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if annotation is float else int(value)
            except ValueError:
                pass
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        integral = number and float(value).is_integer()
        require(
            number and (annotation is float or integral),
            name,
            value,
            f"must be {'a number' if annotation is float else 'an integer'}",
        )
        return annotation(value)
    elif annotation is str:
        require(
            isinstance(value, (str, int, float)) and not isinstance(value, bool),
            name,
            value,
            "must be a string",
        )
        return str(value)
    return value


def coerce_values(types: tuple[type, ...], values: dict[str, Any]) -> dict[str, Any]:
    """Every value whose key is a field of one of ``types``, coerced to that field's type."""
    hints = {}
    for cls in reversed(types):
        hints.update({f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)})
    return {key: coerce(value, hints[key], key) for key, value in values.items() if key in hints}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing, invalid or non-mapping file is a `ConfigError`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    return data


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def flat_values(path: Path, types: tuple[type, ...]) -> dict[str, Any]:
    """Every top-level key of the file is a field of one of ``types``; anything else is an error."""
    values = read_yaml(path)
    unknown = sorted(set(values) - set().union(*(field_names(t) for t in types)))
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}; see --help")
    return values


def parse_dataclasses(
    *types: type,
    args: list[str] | None = None,
    values: Callable[[Path, tuple[type, ...]], dict[str, Any]] = flat_values,
) -> tuple:
    """Parse ``--config FILE`` plus command-line overrides into one instance per dataclass, in order.

    ``values(path, types)`` turns the file into ``{field: value}`` defaults. A field name that two of
    ``types`` share is an error: a key or flag must reach exactly one dataclass.
    """
    from transformers import HfArgumentParser  # transformers is slow to import; only parsing needs it

    seen: dict[str, str] = {}
    for cls in types:
        for name in field_names(cls):
            if name in seen:
                raise ConfigError(f"field {name!r} is in both {seen[name]} and {cls.__name__}: rename one")
            seen[name] = cls.__name__
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, rest = pre.parse_known_args(args)
    parser = HfArgumentParser(types)
    parser.add_argument("--config", type=str, default=None, help="YAML file whose keys set field defaults")
    defaults: dict[str, Any] = {}
    if known.config:
        try:
            defaults = coerce_values(types, values(Path(known.config), types))
        except ConfigError as err:
            if err.field is None:
                raise
            raise ConfigError(f"{known.config}: {err}", field=err.field) from err
        parser.set_defaults(**defaults)
    try:
        parsed = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=False)
    except ConfigError as err:  # a __post_init__ check: say where a value from the file came from
        from_file = err.field in defaults and f"--{err.field}" not in rest
        raise ConfigError(f"{known.config}: {err}" if from_file else str(err), field=err.field) from err
    return tuple(parsed[: len(types)])
