"""One configuration system for every recipe: dataclasses, a YAML file, command-line overrides.

Built on transformers' ``HfArgumentParser`` so that ``--help`` lists every field with its type,
default and help text. A ``--config FILE.yaml`` supplies new defaults; any field given on the
command line wins over the file. Unknown YAML keys are an error naming the file and key, so a
typo never silently falls back to a default. YAML values are checked against the field types here
(argparse checks command-line values); each config dataclass checks its value ranges in
``__post_init__`` with :func:`require`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types as pytypes
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from transformers import HfArgumentParser

from data_prep.errors import UserError
from llmrec.log import get_logger

logger = get_logger(__name__)

T = TypeVar("T")


class ConfigError(UserError):
    """A configuration file or value that cannot be used; ``field`` names the field when there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def require(condition: bool, name: str, value: Any, requirement: str) -> None:
    """Raise a :class:`ConfigError` for field ``name`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"field {name!r} {requirement}, got {value!r}", field=name)


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


def _experiment_fields() -> set[str]:
    """Top-level YAML keys that some recipe uses: the library's shared configs and the data bundle."""
    from llmrec.backbone import BackboneConfig
    from llmrec.model import ModelConfig
    from llmrec.train import TrainConfig
    from llmrec.zeroshot import PromptConfig

    shared = (BackboneConfig, ModelConfig, TrainConfig, PromptConfig)
    return {f.name for cls in shared for f in dataclasses.fields(cls)} | {"data", "run"}


RECIPES = ("pretrain", "finetune", "evaluate", "zeroshot", "export", "recommend", "index", "baselines")


def load_yaml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a YAML mapping of field -> value.

    One file describes one experiment: top-level keys are shared by every recipe, and a mapping named
    after a recipe (``pretrain:``, ``finetune:``, ...) holds that recipe's own values, which win. Other
    recipes' sections are ignored.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    values = {key: value for key, value in data.items() if key not in RECIPES}
    for key in RECIPES:
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping of field: value")
    if section is not None:
        values.update(data.get(section) or {})
    return values


def parse_config(*types: type, args: list[str] | None = None, section: str | None = None) -> tuple:
    """Parse ``--config FILE`` plus command-line overrides into instances of ``types``.

    ``section`` names the recipe whose YAML section applies (see `load_yaml`). Returns one instance per
    dataclass type, in order.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, rest = pre.parse_known_args(args)

    parser = HfArgumentParser(types)
    parser.add_argument("--config", type=str, default=None, help="YAML file whose keys set field defaults")
    values: dict[str, Any] = {}
    if known.config:
        fields = {f.name for t in types for f in dataclasses.fields(t)}
        own = load_yaml(known.config, section) if section else {}
        shared = load_yaml(known.config)
        typos = sorted(set(own) - set(shared) - fields) if section else []
        if typos:
            raise ConfigError(f"{known.config}: unknown field(s) {typos} in section {section!r}; see --help")
        unused = sorted(set(shared) - fields)
        unknown = sorted(set(unused) - _experiment_fields()) if unused else []
        if unknown:
            raise ConfigError(
                f"{known.config}: unknown top-level field(s) {unknown}: no recipe uses them; see --help"
            )
        if unused:
            logger.warning("%s: fields %s are not used by this recipe", known.config, unused)
        try:
            values = coerce_values(types, load_yaml(known.config, section))
        except ConfigError as err:
            raise ConfigError(f"{known.config}: {err}", field=err.field) from err
        parser.set_defaults(**values)
    try:
        parsed = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=False)
    except ConfigError as err:  # a __post_init__ check: say where a value from the file came from
        from_file = err.field in values and f"--{err.field}" not in rest
        raise ConfigError(f"{known.config}: {err}" if from_file else str(err), field=err.field) from err
    return tuple(parsed[: len(types)])


def to_dict(*configs: Any) -> dict[str, Any]:
    """Merge dataclass instances into one JSON-serialisable dict (for run directories)."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return json.loads(json.dumps(merged, default=str))
