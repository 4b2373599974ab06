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

from llmrec.log import get_logger

logger = get_logger(__name__)

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or value that cannot be used."""


RECIPES = (
    "pretrain",
    "finetune",
    "evaluate",
    "zeroshot",
    "export",
    "recommend",
    "index",
    "baselines",
    "align",
)


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
    if known.config:
        fields = {f.name for t in types for f in dataclasses.fields(t)}
        own = load_yaml(known.config, section) if section else {}
        shared = load_yaml(known.config)
        typos = sorted(set(own) - set(shared) - fields) if section else []
        if typos:
            raise ConfigError(f"{known.config}: unknown field(s) {typos} in section {section!r}; see --help")
        unused = sorted(set(shared) - fields)
        if unused:
            logger.warning("%s: fields %s are not used by this recipe", known.config, unused)
        values = load_yaml(known.config, section)
        parser.set_defaults(**{key: value for key, value in values.items() if key in fields})
    parsed = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=False)
    return tuple(parsed[: len(types)])


def to_dict(*configs: Any) -> dict[str, Any]:
    """Merge dataclass instances into one JSON-serialisable dict (for run directories)."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return json.loads(json.dumps(merged, default=str))
