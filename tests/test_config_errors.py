"""Every class of bad argument or config file is one line on stderr and exit code 2, through every
recipe's command line (issue 22): a misspelt flag (with the nearest one), a value the field's type
refuses (non-finite float, a choice not offered, a negative seed), and a config file that is a
directory, not UTF-8, nested too deep, repeats a key or expands an alias bomb.

The cases are derived from each recipe's ``CONFIGS``, so a new recipe or field is covered. They run
``run_cli(main)`` in-process (what ``__main__`` runs); a few go through a real subprocess too.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from conftest import recipe_main

from common.config import MAX_DEPTH
from common.errors import UserError, run_cli
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


# ---------------------------------------------------------------------- cli: bad input and failures
TINY = ["--name_or_path", "tiny-llama", "--lora_r", "4", "--max_doc_tokens", "48", "--batch_size", "4"]
TINY += ["--warmup_ratio", "0", "--log_steps", "1"]
LOG = "user_id,item_id\n" + "".join(f"u{u},i{(3 * u + k) % 11}\n" for u in range(10) for k in range(6))


def cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    environment.pop("LLMREC_DEBUG", None) if "LLMREC_DEBUG" not in (env or {}) else None
    return subprocess.run(
        [sys.executable, *args], env=environment, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def data_prep(*args: str, **kw) -> subprocess.CompletedProcess:
    return cli("-m", "data_prep", *args, **kw)


def recipe(name: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return cli(str(REPO / "recipes" / f"{name}.py"), *args, **kw)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and exactly one line on stderr (after any log lines) that carries every needle."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def source(tmp_path) -> Path:
    directory = tmp_path / "src"
    directory.mkdir()
    (directory / "src.inter").write_text(
        "user_id:token\titem_id:token\n" + LOG.split("\n", 1)[1].replace(",", "\t")
    )
    return directory


def test_build_over_its_own_input_exits_2_and_keeps_the_data(source):
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    result = data_prep("build", "--input", str(source), "--out", str(source), "--overwrite")
    one_line_error(result, "python -m data_prep build: error:", "the output is the --input")
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_debug_shows_the_traceback_of_a_user_error(source):
    for extra, env in ((["--debug"], None), ([], {"LLMREC_DEBUG": "1"})):
        result = data_prep("build", "--input", str(source), "--out", str(source), *extra, env=env)
        assert result.returncode == 1 and "Traceback" in result.stderr and "DataError" in result.stderr


def test_run_cli_keeps_the_traceback_of_a_bug():
    def bug(argv):
        raise ZeroDivisionError("a bug")

    def bad_input(argv):
        raise UserError("bad\ninput")

    with pytest.raises(ZeroDivisionError):
        run_cli(bug, [])
    assert run_cli(bad_input, []) == 2


def test_presplit_overlap_exits_2_naming_file_and_line(source, tmp_path):
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.tsv").write_text("user_id\titem_id\nu1\ti3\nu1\ti4\n")
    (split / "valid.tsv").write_text("user_id\titem_id\nu1\ti5\n")
    (split / "test.tsv").write_text("user_id\titem_id\nu1\ti4\n")
    out = tmp_path / "bundle"
    result = data_prep(
        "build", "--input", str(source), "--split", "presplit", "--presplit", str(split), "--out", str(out)
    )
    one_line_error(result, f"{split / 'test.tsv'}, line 2", "also in train.tsv")
    assert not out.exists()


def build_csv_bundle(tmp_path: Path) -> Path:
    """``LOG`` (user and item ids only, no text) built through the CLI."""
    (tmp_path / "log.csv").write_text(LOG)
    bundle = tmp_path / "bundle"
    result = data_prep("build", "--format", "csv", "--input", str(tmp_path / "log.csv"), "--out", str(bundle))
    assert result.returncode == 0, result.stderr[-3000:]
    return bundle


def test_interactions_only_csv_builds_inspects_and_pretrains(tmp_path):
    bundle = build_csv_bundle(tmp_path)
    inspected = data_prep("inspect", str(bundle))
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    assert "content" in inspected.stdout
    run = tmp_path / "run"
    result = recipe("pretrain", "--data", str(bundle), "--output_dir", str(run), *TINY, "--max_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "content training is skipped" in result.stderr
    assert (run / "model" / "model.safetensors").is_file()


def test_kill_9_during_checkpoint_saves_then_resume(tmp_path):
    """SIGKILL the run while a checkpoint is being written; a fresh run into the directory is refused
    up front, and --resume continues from the newest complete checkpoint, says which, and finishes."""
    bundle = build_csv_bundle(tmp_path)
    run = tmp_path / "run"
    base = [
        "--data",
        str(bundle),
        "--output_dir",
        str(run),
        *TINY,
        "--save_steps",
        "1",
        "--save_total_limit",
        "1",
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), *base, "--max_steps", "400"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints, deadline, completed = run / "checkpoints", time.time() + 300, 0
    try:
        while True:  # wait until a save is under way after at least two complete ones
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint save caught within 300 s"
            names = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
            completed = max(
                [int(n.split("_")[1]) for n in names if n.startswith("checkpoint_")] + [completed]
            )
            if completed >= 2 and any(n.startswith(".checkpoint_") for n in names):
                break
            time.sleep(0.001)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    left = sorted(p.name for p in checkpoints.iterdir())
    newest = max(int(n.split("_")[1]) for n in left if n.startswith("checkpoint_"))
    assert [n for n in left if n.startswith("checkpoint_")] == [f"checkpoint_{newest}"], (
        left
    )  # never rotated away

    fresh = recipe("pretrain", *base, "--max_steps", str(newest + 2))
    one_line_error(fresh, "holds a previous run", "--resume")
    resumed = recipe("pretrain", *base, "--max_steps", str(newest + 2), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resuming from {checkpoints / f'checkpoint_{newest}'} (step {newest} of {newest + 2})"
        in resumed.stderr
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"checkpoint_{newest + 2}"]
    assert (run / "model" / "model.safetensors").is_file()


def test_every_entry_point_reports_a_user_error_in_one_line_with_exit_2(tmp_path):
    """All recipes' ``__main__`` run in one interpreter (one start-up), each with a missing config file."""
    recipes = sorted((REPO / "recipes").glob("*.py"))
    missing = tmp_path / "missing.yaml"
    script = (
        "import runpy, sys\n"
        f"for path in {[str(p) for p in recipes]!r}:\n"
        f"    sys.argv = [path, '--config', {str(missing)!r}]\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as exit:\n"
        "        print(path, exit.code)\n"
    )
    result = cli("-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [word for p in recipes for word in (str(p), "2")]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert [line.split(":")[0] for line in errors] == [p.name for p in recipes]
    assert all(f"config file not found: {missing}" in line for line in errors)
    assert "Traceback" not in result.stderr
