"""Every class of bad argument or config file is one line on stderr and exit code 2, through every
recipe's command line (issue 22): a misspelt flag (with the nearest one), a value the field's type
refuses (non-finite float, a choice not offered, a negative seed), and a config file that is a
directory, not UTF-8, nested too deep, repeats a key or expands an alias bomb.

The cases are derived from each recipe's ``CONFIGS``, so a new recipe or field is covered. They run
``run_cli(main)`` in-process (what ``__main__`` runs); a few go through a real subprocess too.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from conftest import recipe_main

from common.config import MAX_DEPTH
from common.errors import run_cli
from llmrec.config import dotted_flags

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(path.stem for path in (REPO / "recipes").glob("*.py"))


def module(name: str):
    recipe_main(name)
    return sys.modules[f"recipes_{name}"]


MODULES = {name: module(name) for name in RECIPES}


def fields_of(name: str):
    """(flag, type hint, field name) of every field of the recipe's configs."""
    types = MODULES[name].CONFIGS
    flags = dotted_flags(types)
    for i, cls in enumerate(types):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield flags[(i, f.name)][0], hints[f.name], f.name


def plain(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, type(int | None)) and len(args) == 1 else hint


def argument_cases():
    for name in RECIPES:
        first = next(fields_of(name))[0]
        yield name, "misspelt-flag", [first[:-1] + "x", "3"], f"did you mean {first}?"
        yield name, "stray-value", ["3"], "unexpected argument '3'"
        for flag, hint, field in fields_of(name):
            if plain(hint) is float:
                yield name, f"nan-{field}", [flag, "nan"], "must be a finite number, got nan"
                yield name, f"inf-{field}", [f"{flag}=-inf"], "must be a finite number"
            if typing.get_origin(plain(hint)) is typing.Literal:
                yield name, f"choice-{field}", [flag, "bogus"], "must be one of"
            if field == "seed":
                yield name, f"seed-{flag}", [flag, "-1"], f"{flag}: field 'seed' must be >= 0, got -1"


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh", strict=True)
)


CONFIG_CASES = ["directory", "not-utf8", "too-deep-for-the-parser", "too-deep", "repeated-key", "alias-bomb"]


def config_cases(tmp: Path):
    """name -> (file, needle): each a class of bad config file."""
    deep = tmp / "deep.yaml"
    deep.write_text("x: " + "[" * 5000 + "]" * 5000 + "\n")
    nested = tmp / "nested.yaml"
    nested.write_text("x: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n")
    latin = tmp / "latin.yaml"
    latin.write_bytes("data: caf\xe9\n".encode("latin-1"))
    twice = tmp / "twice.yaml"
    twice.write_text("data: a\nbackbone: {num_layers: 2}\ndata: b\n")
    bomb = tmp / "bomb.yaml"
    bomb.write_text(BOMB)
    return {
        "directory": (tmp, "is a directory"),
        "not-utf8": (latin, "not UTF-8"),
        "too-deep-for-the-parser": (deep, "nested too deep"),
        "too-deep": (nested, f"nested deeper than {MAX_DEPTH}"),
        "repeated-key": (twice, "line 3: key 'data' repeated (first on line 1)"),
        "alias-bomb": (bomb, "more than 100000 values"),
    }


def one_line(capsys, name: str, argv: list[str]) -> str:
    assert run_cli(MODULES[name].main, argv, prog=f"{name}.py") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert len(lines[0]) < 700, lines[0]  # an expanded value is never printed whole
    return lines[0]


@pytest.mark.parametrize(
    ("name", "argv", "needle"),
    [(n, a, x) for n, _, a, x in argument_cases()],
    ids=[f"{n}-{c}" for n, c, *_ in argument_cases()],
)
def test_every_bad_argument_class_is_one_line_and_exit_2(capsys, name, argv, needle):
    assert needle in one_line(capsys, name, argv)


@pytest.mark.parametrize("case", CONFIG_CASES)
@pytest.mark.parametrize("name", RECIPES)
def test_every_bad_config_file_class_is_one_line_and_exit_2(capsys, tmp_path, name, case):
    cases = config_cases(tmp_path)
    assert list(cases) == CONFIG_CASES
    path, needle = cases[case]
    line = one_line(capsys, name, ["--config", str(path)])
    assert needle in line and str(path) in line


def test_every_recipe_has_float_choice_and_seed_cases():
    covered = {name for name, case, *_ in argument_cases() if case.startswith(("nan-", "choice-", "seed-"))}
    assert covered == set(RECIPES) - {"recommend"}  # recommend has neither a float, a choice nor a seed


@pytest.mark.parametrize(
    ("name", "argv", "needle"),
    [
        ("finetune", ["--bogus_flag", "3"], "unknown argument '--bogus_flag'"),
        ("evaluate", ["--split", "train"], "must be one of ['test', 'valid'], got 'train'"),
        ("baselines", ["--models", "pop,foo"], "--baselines.models: field 'models' must name some of"),
        ("zeroshot", ["--max_users", "0"], "field 'max_users' must be at least 1, got 0"),
        ("pretrain", ["--seed", "-1"], "--train.seed: field 'seed' must be >= 0"),
    ],
)
def test_the_reported_examples_through_a_subprocess(name, argv, needle):
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / f"{name}.py"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert needle in line, line
