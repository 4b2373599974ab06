"""The guarded artefact writer (issue 22): inputs are never outputs, only a directory with the kind's
marker is replaced, one writer per target, and a kill between any two steps of a replace leaves the old
or the new content complete (recovered by the next reader or writer)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import STEPS, kill_during

from common import artifacts
from common.artifacts import Kind, Lock, recover, write_directory
from common.errors import MAX_MESSAGE, UserError, run_cli
from common.io import ArtifactError, write_json

KIND = Kind("test artefact", "marker.json")
FILES = ("marker.json", "a.txt", "sub/b.txt")


def write(out: Path, content: str, **kw) -> Path:
    with write_directory(out, KIND, **kw) as tmp:
        for name in FILES:
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_text(content)
    return out


def content(out: Path) -> str:
    """The one value every file of ``out`` holds: the directory is complete and not mixed."""
    values = {(out / name).read_text() for name in FILES}
    assert len(values) == 1, f"{out} is mixed or incomplete: {values}"
    return values.pop()


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# ------------------------------------------------------------------------------------------- the rules
def test_replace_needs_the_flag_and_the_marker(tmp_path):
    out = write(tmp_path / "art", "old")
    with pytest.raises(ArtifactError, match="already exists here; pass --overwrite"):
        write(out, "new")
    assert content(write(out, "new", overwrite=True)) == "new" and leftovers(out) == []
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "t.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"holds no marker.json of a test artefact.*--overwrite will not"):
        write(foreign, "new", overwrite=True)
    assert (foreign / "t.txt").read_text() == "mine" and leftovers(foreign) == []
    (tmp_path / "empty").mkdir()
    assert content(write(tmp_path / "empty", "new")) == "new"  # an empty directory is free


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_an_output_that_is_inside_or_contains_an_input_is_refused(tmp_path, where):
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep.txt").write_text("x")
    out = {"is": data, "inside": data / "art", "contains": tmp_path}[where]
    relation = "lies inside" if where == "inside" else where
    with pytest.raises(ArtifactError, match=f"the output {relation} the --data"):
        write(out, "new", overwrite=True, inputs={"--data": data, "--init": None})
    assert [p.name for p in data.iterdir()] == ["keep.txt"]
    if where == "inside":  # an input named in nested may hold the output (an index in its dataset)
        write(out, "new", inputs={"--data": data}, nested={"--data"})
        assert content(out) == "new"


def test_a_second_writer_of_the_same_target_is_refused(tmp_path):
    out = tmp_path / "art"
    with write_directory(out, KIND) as tmp:
        (tmp / "marker.json").write_text("{}")
        with pytest.raises(ArtifactError, match=r"another process \(pid \d+\) is writing it now"):
            write(out, "second")
    assert (out / "marker.json").is_file() and leftovers(out) == []


def test_a_lock_held_by_another_process_refuses_and_a_dead_holder_does_not(tmp_path):
    out = tmp_path / "art"
    (locked_r, locked_w), (die_r, die_w) = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the other process: hold the lock until told to die
        try:
            Lock(out).acquire()
            os.write(locked_w, b"1")
            os.read(die_r, 1)
        finally:
            os._exit(0)
    os.read(locked_r, 1)
    with pytest.raises(ArtifactError, match=f"another process \\(pid {pid}\\)"):
        write(out, "mine")
    os.write(die_w, b"1")
    os.waitpid(pid, 0)
    assert content(write(out, "mine")) == "mine"


# ------------------------------------------------------------------------------------------- kills
@pytest.mark.parametrize("step", range(1, STEPS + 2))
def test_a_kill_between_any_two_steps_leaves_the_old_or_the_new_content(tmp_path, step):
    out = write(tmp_path / "art", "old")
    status = kill_during(out, step, lambda: write(out, "new", overwrite=True))
    assert status == (9 if step <= STEPS else 0)
    recover(out)  # what every reader and the next writer do first
    assert content(out) == ("old" if step <= 2 else "new")
    assert leftovers(out) == []
    assert content(write(out, "newer", overwrite=True)) == "newer"  # and the next write works


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_a_failure_at_any_step_keeps_the_old_content(tmp_path, monkeypatch, step):
    out = write(tmp_path / "art", "old")
    calls = [0]
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def failing(real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                raise OSError(errno.EIO, "I/O error")
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(artifacts.os, "rename", failing(real_rename))
    monkeypatch.setattr(artifacts.shutil, "rmtree", failing(real_rmtree))
    if step < STEPS:
        with pytest.raises(OSError, match="I/O error"):
            write(out, "new", overwrite=True)
        assert content(out) == "old" and leftovers(out) == []
    else:  # the new content is in place; only deleting the old one failed (a warning)
        write(out, "new", overwrite=True)
        assert content(out) == "new"


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EFBIG, "File too large"),
        RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),
    ],
)
def test_a_full_disk_is_one_line_and_replaces_nothing(tmp_path, error):
    out = write(tmp_path / "art", "old")
    with pytest.raises(ArtifactError, match=r"disk full or file size limit\?\); nothing was replaced"):
        with write_directory(out, KIND, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise error
    assert content(out) == "old" and leftovers(out) == []


def test_a_real_file_size_limit_during_a_write(tmp_path):
    """``ulimit -f``: Python ignores SIGXFSZ, the write fails with EFBIG; checked in a child process."""
    import resource

    out = write(tmp_path / "art", "old")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
            with write_directory(out, KIND, overwrite=True) as tmp:
                (tmp / "a.txt").write_bytes(b"x" * 100_000)
        except ArtifactError as err:
            code = 0 if "File too large" in str(err) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert content(out) == "old" and leftovers(out) == []


# ------------------------------------------------------------------------------------------- files, errors
def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "x.json", {})
        out = write(tmp_path / "art", "new")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_error_messages_are_bounded(capsys):
    huge = "[" + ", ".join(["lol"] * 1_000_000) + "]"  # what a YAML alias bomb expands to

    def main(argv):
        raise UserError(f"field 'x' must be a number, got {huge}; fix the config")

    assert run_cli(main, [], prog="recipe") == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and len(line) < MAX_MESSAGE + 200
    assert line.startswith("recipe: error: field 'x' must be a number") and "fix the config" in line
    assert len(str(ArtifactError(huge, file="f"))) < MAX_MESSAGE + 100
