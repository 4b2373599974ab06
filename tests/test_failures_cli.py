"""The worst failures of issue 12 end to end through the command lines, and the one exit-code policy:
a user error is one line on stderr and exit code 2 (``--debug``/``LLMREC_DEBUG=1``: the traceback), a
bug keeps its traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
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
