"""One configuration system for every recipe: dataclasses, one YAML file per experiment nested by
component, command-line overrides.

Every config dataclass names its YAML section (``section``: ``backbone``, ``model``, ``train``,
``prompt``, ``ease``, ``multvae``, or the recipe's own: ``pretrain``, ``finetune``, ...)::

    data: data/ml-100k                 # the dataset bundle of every recipe that reads one
    backbone: {name_or_path: smollm2-135m, num_layers: 2}
    model: {lora_r: 8}
    train: {batch_size: 16, seed: 42}
    pretrain:
      train: {output_dir: runs/x/pretrain, max_steps: 40}   # this recipe's own train values
    finetune:
      init: runs/x/pretrain
      train: {output_dir: runs/x/finetune, epochs: 2}
    evaluate: {run: runs/x/finetune, split: test}

A recipe reads the sections of its dataclasses; its own section (that of its first dataclass) holds its
own fields and may nest component sections that override the shared ones for this recipe only. So
every key reaches exactly one dataclass: a key that is no field of its section, a top-level key other
than ``data`` (the flat format of llmrec 0.1), and a field name two of a recipe's dataclasses share are
errors naming the file and the key. Sections of other recipes are left alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from common.config import ConfigError, field_names, parse_dataclasses, read_yaml

__all__ = ["SHARED", "ConfigError", "nested_values", "parse_config", "to_dict"]

SHARED = {"data"}  # top-level values read by the field of that name in the recipe's own dataclass


def section_of(cls: type) -> str:
    section = getattr(cls, "section", None)
    if not isinstance(section, str):
        raise ConfigError(f"{cls.__name__} names no YAML section (a `section: ClassVar[str]` attribute)")
    return section


def _mapping(value: Any, path: Path, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: section {where!r} must be a mapping of field: value")
    return value


def nested_values(path: Path, types: tuple[type, ...]) -> dict[str, Any]:
    """The defaults a nested experiment file gives ``types`` (the recipe's own dataclass first)."""
    data = read_yaml(path)
    sections = {section_of(cls) for cls in types}
    stray = sorted(k for k, v in data.items() if k not in SHARED | sections and not isinstance(v, dict))
    if stray:
        moves = [f"{key} -> {section_of(cls)}:" for key in stray for cls in types if key in field_names(cls)]
        raise ConfigError(
            f"{path}: top-level key(s) {stray} outside a section; configs are nested by component since "
            f"llmrec 0.2 (README, Configuration){': move ' + ', '.join(moves) if moves else ''}"
        )
    own = section_of(types[0])
    components = {section_of(cls) for cls in types[1:]}
    recipe = _mapping(data.get(own), path, own)
    values: dict[str, Any] = {
        key: data[key] for key in SHARED if key in data and key in field_names(types[0])
    }
    for cls in types:
        name = section_of(cls)
        if cls is types[0]:
            section = {key: value for key, value in recipe.items() if key not in components}
        else:
            section = {
                **_mapping(data.get(name), path, name),
                **_mapping(recipe.get(name), path, f"{own}.{name}"),
            }
        unknown = sorted(set(section) - field_names(cls))
        if unknown:
            raise ConfigError(
                f"{path}: unknown field(s) {unknown} in section {name!r} ({cls.__name__}); see --help"
            )
        values.update(section)
    return values


def parse_config(*types: type, args: list[str] | None = None) -> tuple:
    """Parse ``--config FILE`` (nested, see the module docstring) plus command-line overrides into
    one instance per dataclass, in order; the first is the recipe's own."""
    return parse_dataclasses(*types, args=args, values=nested_values)


def to_dict(*configs: Any) -> dict[str, Any]:
    """Merge dataclass instances into one JSON-serialisable dict (for run directories)."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return json.loads(json.dumps(merged, default=str))
