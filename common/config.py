"""Dataclass configs from a YAML file plus command-line overrides.

``--help`` lists every field with its type, default and help text, grouped by dataclass; ``--config
FILE.yaml`` supplies new defaults and any field given on the command line wins. File values are
checked against the field types here (`coerce`; the parser checks command-line values the same way);
each dataclass checks its value ranges in ``__post_init__`` with `require`. How a file's keys map to
fields and which flags reach a field is the caller's (`flat_values`/`flat_flags` here: every field is
``--name``; `llmrec.config` nests them by component and adds dotted flags).

The parser is argparse's, not transformers' ``HfArgumentParser``: that one keys every flag by the bare
field name, so two dataclasses of one command cannot share a field name (``--train.batch_size`` beside
``--eval.batch_size``), and it reports a misspelt flag with a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types as pytypes
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from common.errors import UserError, shown

MAX_DEPTH = 32  # deepest nesting of a config file's values
MAX_NODES = 100_000  # values in a config file, aliases expanded (a YAML alias bomb grows x9 per level)
REQUIRED = argparse.SUPPRESS  # the parsed value of a field without a default that nothing set


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
    become numbers; a float must be finite (``.nan``/``.inf`` are never a hyper-parameter); anything else
    must already have the right type. Types it does not know pass.
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
        whole = isinstance(value, int) and not isinstance(value, bool)
        finite = whole or (isinstance(value, float) and math.isfinite(value))
        require(
            finite and (annotation is float or whole or float(value).is_integer()),
            name,
            value,
            f"must be {'a finite number' if annotation is float else 'an integer'}",
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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise ConfigError(
                        f"line {key.start_mark.line + 1}: key {shown(key.value)} repeated "
                        f"(first on line {seen[key.value]}); give each key once"
                    )
                seen[key.value] = key.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def check_size(value: Any, path: Path) -> None:
    """Refuse values nested deeper than `MAX_DEPTH` or with more than `MAX_NODES` parts (aliases
    expanded): nothing a config needs, and every later step walks them."""
    budget = MAX_NODES
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if depth > MAX_DEPTH:
            raise ConfigError(f"{path}: values nested deeper than {MAX_DEPTH} levels")
        if budget < 0:
            raise ConfigError(f"{path}: more than {MAX_NODES} values (YAML aliases expanded)")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing, unreadable, invalid, non-mapping, too deep or too
    large file, or one that repeats a key, is a `ConfigError` naming it."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}  # noqa: S506 (safe loader)
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except IsADirectoryError as err:
        raise ConfigError(f"{path}: is a directory, not a YAML file") from err
    except (PermissionError, UnicodeDecodeError) as err:
        reason = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else "cannot be read"
        raise ConfigError(f"{path}: {reason}") from err
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    except RecursionError as err:
        raise ConfigError(f"{path}: values nested too deep") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())[:300]}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    check_size(data, path)
    return data


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def flat_values(path: Path, types: tuple[type, ...]) -> list[dict[str, Any]]:
    """Every top-level key of the file is a field of one of ``types``; anything else is an error.
    One ``{field: value}`` per dataclass, in order."""
    values = read_yaml(path)
    unknown = sorted(set(values) - set().union(*(field_names(t) for t in types)))
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}; see --help")
    return [{k: v for k, v in values.items() if k in field_names(cls)} for cls in types]


Flags = dict[tuple[int, str], list[str]]  # (dataclass index, field) -> its flags, the first as shown


def flat_flags(types: tuple[type, ...]) -> Flags:
    """``--name`` for every field (plus ``metadata["aliases"]``); a name two dataclasses share is an error."""
    flags: Flags = {}
    seen: dict[str, str] = {}
    for i, cls in enumerate(types):
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.name in seen:
                raise ConfigError(
                    f"field {f.name!r} is in both {seen[f.name]} and {cls.__name__}: rename one"
                )
            seen[f.name] = cls.__name__
            flags[(i, f.name)] = [f"--{f.name}", *f.metadata.get("aliases", ())]
    return flags


class _Parser(argparse.ArgumentParser):
    """argparse that raises a :class:`ConfigError` (one line, exit 2 through ``common.errors``)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--a, --b VALUE`` rather than ``--a VALUE, --b VALUE``; no ``(default: None)``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        text = super()._format_action_invocation(action)
        if action.option_strings and action.nargs != 0:
            metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
            text = f"{', '.join(action.option_strings)} {metavar}"
        return text


def to_bool(text: str) -> bool:
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {shown(text)}")


def _scalar(annotation: Any) -> Callable[[str], Any]:
    """The argparse ``type`` of a command-line value: `coerce` on the string, so the file and the
    command line accept the same values."""

    def parse(text: str) -> Any:
        if annotation is bool:
            return to_bool(text)
        try:
            return coerce(text, annotation, "")
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).replace("field '' ", "")) from None

    parse.__name__ = getattr(annotation, "__name__", "value")
    return parse


def _add_field(
    group: argparse._ArgumentGroup, f: dataclasses.Field, hint: Any, dest: str, flags: list[str]
) -> None:
    """One dataclass field as one argparse option; a default-true bool also gets a hidden ``--no_NAME``."""
    kwargs: dict[str, Any] = {"dest": dest, "help": f.metadata.get("help", ""), "metavar": f.name.upper()}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, pytypes.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        kwargs["choices"] = typing.get_args(hint)
        kwargs["metavar"] = "{" + ",".join(map(str, kwargs["choices"])) + "}"
    if typing.get_origin(hint) is list:
        kwargs.update(nargs="+", type=_scalar(typing.get_args(hint)[0]))
    elif hint is bool:
        kwargs.update(nargs="?", const=True, type=_scalar(bool), metavar="{true,false}")
    else:
        kwargs["type"] = _scalar(hint)
    default = f.default
    if default is dataclasses.MISSING:
        default = REQUIRED if f.default_factory is dataclasses.MISSING else f.default_factory()
        kwargs["help"] += " (required)" if default is REQUIRED else ""
    group.add_argument(*flags, default=default, **kwargs)
    hyphens = [flag.replace("_", "-") for flag in flags if "_" in flag]  # as HfArgumentParser took them
    if hyphens:
        group.add_argument(*hyphens, **{**kwargs, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS})
    if hint is bool and default is True:
        flat = [flag for flag in flags if flag.startswith("--") and "." not in flag]
        if flat:
            group.add_argument(f"--no_{flat[0][2:]}", dest=dest, action="store_false", help=argparse.SUPPRESS)


def _unknown(parser: argparse.ArgumentParser, extra: list[str]) -> ConfigError:
    """The error for arguments no field takes, with the nearest flag when one is close."""
    flag = next((arg.split("=", 1)[0] for arg in extra if arg.startswith("-")), None)
    if flag is None:
        return ConfigError(f"unexpected argument {shown(extra[0])}: every value follows its --flag")
    options = [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
    close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; see --help"
    return ConfigError(f"unknown argument {shown(flag)}{hint}")


def parse_dataclasses(
    *types: type,
    args: list[str] | None = None,
    values: Callable[[Path, tuple[type, ...]], list[dict[str, Any]]] = flat_values,
    flags: Callable[[tuple[type, ...]], Flags] = flat_flags,
    titles: list[str] | None = None,
) -> tuple:
    """Parse ``--config FILE`` plus command-line overrides into one instance per dataclass, in order.

    ``values(path, types)`` turns the file into one ``{field: value}`` of defaults per dataclass;
    ``flags(types)`` names the command-line flags of every field; ``--help`` shows one group per
    dataclass, titled ``titles[i]``. Every bad argument or value is a `ConfigError`.
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=str, default=None)
    known, rest = pre.parse_known_args(args)
    options = flags(types)
    usage = "%(prog)s [-h] [--config FILE.yaml] [--flag VALUE ...]"
    parser = _Parser(usage=usage, formatter_class=_Formatter, allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, help="YAML file whose keys set field defaults")
    for i, cls in enumerate(types):
        hints = typing.get_type_hints(cls)
        title = titles[i] if titles else cls.__name__
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]  # a dataclass without one gets its signature
        group = parser.add_argument_group(title, None if doc.startswith(f"{cls.__name__}(") else doc or None)
        for f in dataclasses.fields(cls):
            if f.init:
                _add_field(group, f, hints[f.name], f"{i}:{f.name}", options[(i, f.name)])
    from_file: set[str] = set()
    if known.config:
        try:
            for i, (cls, given) in enumerate(zip(types, values(Path(known.config), types), strict=True)):
                hints = typing.get_type_hints(cls)
                defaults = {f"{i}:{key}": coerce(value, hints[key], key) for key, value in given.items()}
                parser.set_defaults(**defaults)
                from_file |= set(defaults)
        except ConfigError as err:
            if err.field is None:
                raise
            raise ConfigError(f"{known.config}: {err}", field=err.field) from err
    namespace, extra = parser.parse_known_args(rest)
    if extra:
        raise _unknown(parser, extra)
    parsed = []
    for i, cls in enumerate(types):
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        missing = [options[(i, name)][0] for name in names if not hasattr(namespace, f"{i}:{name}")]
        if missing:
            raise ConfigError(f"{', '.join(missing)} required (on the command line or in --config)")
        try:
            parsed.append(cls(**{name: getattr(namespace, f"{i}:{name}") for name in names}))
        except ConfigError as err:  # a __post_init__ check: say where a value from the file came from
            flags_of = options.get((i, err.field or ""), [])
            typed = any(a.split("=", 1)[0] in flags_of for a in rest)
            where = f"{known.config}: " if f"{i}:{err.field}" in from_file and not typed else ""
            where += f"{flags_of[0]}: " if flags_of else ""
            raise ConfigError(f"{where}{err}", field=err.field) from err
    return tuple(parsed)
