"""One configuration system for every recipe: dataclasses, one YAML file per experiment nested by
component, command-line overrides with dotted flags that follow the nesting.

Every config dataclass names its YAML section (``section``: ``backbone``, ``model``, ``train``,
``eval``, ``prompt``, ``ease``, ``multvae``, ``sasrec``, or the recipe's own: ``pretrain``,
``finetune``, ...)::

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
every key reaches exactly one dataclass: a key that is no field of its section, and a top-level key
other than ``data`` (the flat format of llmrec 0.1), are errors naming the file and the key. Sections
of other recipes are left alone. A dataclass may list keys it used to hold (``former``: old key ->
``section.field``), e.g. ``finetune: {eval_batch_size: 16}`` before `EvalConfig` existed; they keep
working in the file and as flags.

On the command line the same path is the flag: ``--train.lr`` (or ``--finetune.train.lr``, as the file
would say it for this recipe only; the same field here) and ``--finetune.init``. The bare field name
(``--lr``) stays an alias, reaching the first of the recipe's dataclasses that has the field (the
group ``--help`` lists it under), so the flags of llmrec 0.2 still work.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from common.config import ConfigError, Flags, field_names, parse_dataclasses, read_yaml, require

__all__ = ["SHARED", "ConfigError", "dotted_flags", "nested_values", "parse_config", "require", "to_dict"]

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


def former_keys(cls: type) -> dict[str, str]:
    """Keys ``cls``'s section used to hold: old key -> ``section.field`` where the value goes now."""
    return dict(getattr(cls, "former", {}))


def nested_values(path: Path, types: tuple[type, ...]) -> list[dict[str, Any]]:
    """The defaults a nested experiment file gives ``types`` (the recipe's own dataclass first), one
    ``{field: value}`` per dataclass: shared component sections first, then the recipe's section and
    the component sections nested in it, each overriding what came before."""
    data = read_yaml(path)
    sections = [section_of(cls) for cls in types]
    stray = sorted(k for k, v in data.items() if k not in SHARED | set(sections) and not isinstance(v, dict))
    if stray:
        moves = [f"{key} -> {section_of(cls)}:" for key in stray for cls in types if key in field_names(cls)]
        raise ConfigError(
            f"{path}: top-level key(s) {stray} outside a section; configs are nested by component since "
            f"llmrec 0.2 (README, Configuration){': move ' + ', '.join(moves) if moves else ''}"
        )
    own = sections[0]
    recipe = _mapping(data.get(own), path, own)
    values: list[dict[str, Any]] = [{} for _ in types]
    values[0].update({key: data[key] for key in SHARED if key in data and key in field_names(types[0])})
    where = [(i, name, data.get(name)) for i, name in enumerate(sections) if i]
    where.append((0, own, {key: value for key, value in recipe.items() if key not in sections[1:]}))
    where += [(i, f"{own}.{name}", recipe.get(name)) for i, name in enumerate(sections) if i]
    for i, name, section in where:
        cls, unknown = types[i], []
        for key, value in _mapping(section, path, name).items():
            target = former_keys(cls).get(key, f"{sections[i]}.{key}")
            part, _, field = target.partition(".")
            j = sections.index(part) if part in sections else None
            if j is None or field not in field_names(types[j]):
                unknown.append(key)
            else:
                values[j][field] = value
        if unknown:
            raise ConfigError(
                f"{path}: unknown field(s) {sorted(unknown)} in section {name!r} ({cls.__name__}); see --help"
            )
    return values


def dotted_flags(types: tuple[type, ...]) -> Flags:
    """Each field's flags: its dotted path (``--train.lr``, ``--finetune.train.lr``), the bare name where
    this is the first of ``types`` to have it, its ``metadata["aliases"]``, and the recipes' former
    keys as flat flags (``--eval_batch_size``)."""
    own = section_of(types[0])
    flags: Flags = {}
    owner: dict[str, int] = {}
    for i, cls in enumerate(types):
        paths = [own] if i == 0 else [section_of(cls), f"{own}.{section_of(cls)}"]
        for f in (f for f in dataclasses.fields(cls) if f.init):
            owner.setdefault(f.name, i)
            flat = [f"--{f.name}"] if owner[f.name] == i else []
            flags[(i, f.name)] = [*(f"--{p}.{f.name}" for p in paths), *flat, *f.metadata.get("aliases", ())]
    taken = {flag for options in flags.values() for flag in options}
    sections = [section_of(cls) for cls in types]
    for cls in types:
        for key, target in former_keys(cls).items():
            part, _, field = target.partition(".")
            target_flags = flags.get((sections.index(part), field)) if part in sections else None
            if target_flags is not None and f"--{key}" not in taken:
                target_flags.append(f"--{key}")
                taken.add(f"--{key}")
    return flags


def parse_config(*types: type, args: list[str] | None = None) -> tuple:
    """Parse ``--config FILE`` (nested, see the module docstring) plus command-line overrides into
    one instance per dataclass, in order; the first is the recipe's own."""
    titles = [f"{section_of(cls)} ({cls.__name__})" for cls in types]
    return parse_dataclasses(*types, args=args, values=nested_values, flags=dotted_flags, titles=titles)


def to_dict(*configs: Any) -> dict[str, Any]:
    """Dataclass instances as one JSON-serialisable dict nested as the YAML is (for run directories and
    result files): the first one's fields at the top, each other one under its section."""
    first, *others = configs
    merged = {**dataclasses.asdict(first), **{section_of(c): dataclasses.asdict(c) for c in others}}
    return json.loads(json.dumps(merged, default=str))
