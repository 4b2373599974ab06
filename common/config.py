"""Dataclass configs from a YAML file plus command-line overrides, on transformers' ``HfArgumentParser``.

``--help`` lists every field with its type, default and help text; ``--config FILE.yaml`` supplies new
defaults and any field given on the command line wins. How a file's keys map to fields is the caller's
(`flat_values` here for a single dataclass; `llmrec.config` nests them by component).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or value that cannot be used."""


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
    if known.config:
        parser.set_defaults(**values(Path(known.config), types))
    parsed = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=False)
    return tuple(parsed[: len(types)])
