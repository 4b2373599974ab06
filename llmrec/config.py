"""One configuration system for every recipe: dataclasses, a YAML file, command-line overrides.

Built on transformers' ``HfArgumentParser`` so that ``--help`` lists every field with its type,
default and help text. A ``--config FILE.yaml`` supplies new defaults; any field given on the
command line wins over the file. Unknown YAML keys are an error naming the file and key, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or value that cannot be used."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML mapping of field -> value (nested sections are flattened one level)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # sections such as `model:` / `training:` are for readability only
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_config(*types: type, args: list[str] | None = None) -> tuple:
    """Parse ``--config FILE`` plus command-line overrides into instances of ``types``.

    Returns one instance per dataclass type, in order.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, rest = pre.parse_known_args(args)

    parser = HfArgumentParser(types)
    parser.add_argument("--config", type=str, default=None, help="YAML file whose keys set field defaults")
    if known.config:
        values = load_yaml(known.config)
        fields = {f.name for t in types for f in dataclasses.fields(t)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"{known.config}: unknown field(s) {unknown}; see --help for the valid names")
        parser.set_defaults(**values)
    parsed = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=False)
    return tuple(parsed[: len(types)])


def to_dict(*configs: Any) -> dict[str, Any]:
    """Merge dataclass instances into one JSON-serialisable dict (for run directories)."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return json.loads(json.dumps(merged, default=str))
