"""The guarded artefact writer (issue 22): inputs are never outputs, only a directory with the kind's
marker is replaced, one writer per target, and a kill between any two steps of a replace leaves the old
or the new content complete (recovered by the next reader or writer)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, STEPS, kill_during, perturb_trainable, recipe_main

from common import artifacts
from common.artifacts import Kind, Lock, recover, write_directory
from common.errors import MAX_MESSAGE, UserError, run_cli
from common.io import ArtifactError, write_json
from data_prep import DataError, load_bundle
from data_prep.build import BuildConfig, build
from llmrec.bundle import read_config, verify_files
from llmrec.checkpoint import complete_checkpoints, save_checkpoint, settle_checkpoints
from llmrec.indexing.base import ItemIndex
from llmrec.model import CLLM4Rec
from llmrec.options import BackboneConfig, ModelConfig
from llmrec.pipeline import model_for
from llmrec.recommender import Recommender
from llmrec.run import RunError

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


# ---------------------------------------------------------------------- artifacts: bad input and failures
FIXTURE = REPO / "tests" / "fixtures" / "bundle-0.1.0" / "bundle"
STEP_CASES = range(1, STEPS + 2)  # killed before step 1..4 of the replace, or not killed


def log(n_users: int) -> str:
    rows = "".join(f"u{u},i{(u + k) % 7},{10 * k}\n" for u in range(n_users) for k in range(5))
    return "user_id,item_id,timestamp\n" + rows


def csv_bundle(root: Path, n_users: int, out: Path, **kw) -> Path:
    source = root / f"src{n_users}" / "log.csv"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(log(n_users))
    config = BuildConfig(format="csv", input=str(source), out=str(out), time_col="timestamp", **kw)
    return build(config)


def expected(step: int, old, new):
    """What a reader finds after a kill before ``step``: the old content until the new one is renamed."""
    return old if step <= 2 else new


@pytest.fixture(scope="module")
def recommender() -> Recommender:
    return Recommender.from_pretrained(FIXTURE, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artefact-data")
    return csv_bundle(root, 6, root / "bundle")


# ------------------------------------------------------------------------------------------- kills, per kind
@pytest.mark.parametrize("step", STEP_CASES)
def test_dataset_bundle_replace_killed_at_any_step(tmp_path, step):
    out = csv_bundle(tmp_path, 6, tmp_path / "bundle")
    status = kill_during(out, step, lambda: csv_bundle(tmp_path, 7, out, overwrite=True))
    assert status == (9 if step <= STEPS else 0)
    if step == 3:  # the case: a failing build after the kill must not lose both bundles
        with pytest.raises(DataError):
            build(BuildConfig(format="csv", input=str(tmp_path / "nope.csv"), out=str(out), overwrite=True))
    assert load_bundle(out).n_users == expected(step, 6, 7)  # loads with every sha256 checked


@pytest.mark.parametrize("step", STEP_CASES)
def test_item_index_save_killed_at_any_step(tmp_path, step):
    old = ItemIndex(codes=np.arange(10).reshape(10, 1), codebook_sizes=(10,), method="sequential")
    new = ItemIndex(codes=np.arange(10)[::-1].reshape(10, 1).copy(), codebook_sizes=(10,), method="random")
    out = old.save(tmp_path / "index")
    kill_during(out, step, lambda: new.save(out, overwrite=True))
    assert ItemIndex.load(out).method == expected(step, "sequential", "random")


@pytest.mark.parametrize("step", STEP_CASES)
def test_recommender_bundle_replace_killed_at_any_step(recommender, tmp_path, step):
    out = tmp_path / "bundle"
    shutil.copytree(FIXTURE, out)
    kill_during(out, step, lambda: recommender.save_pretrained(out, overwrite=True))
    source = read_config(out)["source"]
    assert ("saved_by" in source) == (step > 2)
    verify_files(out, read_config(out)["files"])  # complete: every listed file, every sha256


@pytest.mark.parametrize("step", [2, 3])  # either side of the rename that puts the new one in place
def test_recommender_bundle_after_a_kill_loads_and_scores(recommender, tmp_path, step):
    out = tmp_path / "bundle"
    shutil.copytree(FIXTURE, out)
    kill_during(out, step, lambda: recommender.save_pretrained(out, overwrite=True))
    loaded = Recommender.from_pretrained(out, device="cpu")
    assert torch.allclose(loaded.score_batch(["u0"]), recommender.score_batch(["u0"]), atol=1e-5)


@pytest.mark.parametrize("step", [2, 3, STEPS + 1])
def test_model_directory_save_killed_at_any_step(data, tmp_path, step):
    model = model_for(load_bundle(data), ModelConfig(lora_r=4), BackboneConfig("tiny-llama"))
    out = tmp_path / "model"
    model.save_pretrained(out)
    old = {k: v.clone() for k, v in model.trainable_state_dict().items()}

    def save_perturbed():
        perturb_trainable(model)  # in the child only
        model.save_pretrained(out)

    kill_during(out, step, save_perturbed)
    loaded = CLLM4Rec.from_pretrained(out).trainable_state_dict()
    same = all(torch.equal(loaded[k], old[k]) for k in old)
    assert same == (step <= 2)


class StubAccelerator:
    """The part of accelerate's Accelerator that save_checkpoint uses: one process, a file per state."""

    is_main_process = True

    def __init__(self, value: str):
        self.value = value

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_text(self.value)


@pytest.mark.parametrize("step", STEP_CASES)
def test_checkpoint_of_the_same_step_saved_again_killed_at_any_step(tmp_path, step):
    """The end-of-run save when the last step is a multiple of save_steps, or a resumed run's first save:
    the complete checkpoint must survive until the new one is in place; --resume then finds one."""
    run = tmp_path / "run"
    state = {"step": 4, "epoch": 0}
    save_checkpoint(StubAccelerator("old"), run, state, keep=2)
    final = run / "checkpoints" / "checkpoint_4"
    kill_during(final, step, lambda: save_checkpoint(StubAccelerator("new"), run, state, keep=2))
    settle_checkpoints(StubAccelerator(""), run)  # what --resume and the next save do first
    assert complete_checkpoints(run) == [final]
    records = json.loads((final / "trainer_state.json").read_text())["files"]
    verify_files(final, records)
    assert (final / "model.safetensors").read_text() == expected(step, "old", "new")
    assert sorted(p.name for p in final.parent.iterdir()) == ["checkpoint_4"]


def test_checkpoint_on_a_full_disk_is_a_run_error(tmp_path):
    class Full(StubAccelerator):
        def save_state(self, path: str) -> None:
            Path(path).mkdir(parents=True)
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    run = tmp_path / "run"
    save_checkpoint(StubAccelerator("old"), run, {"step": 2}, keep=2)
    with pytest.raises(RunError, match=r"checkpoint_2: cannot write the checkpoint: No space left on device"):
        save_checkpoint(Full(""), run, {"step": 2}, keep=2)
    assert (run / "checkpoints" / "checkpoint_2" / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint_2"]


# ------------------------------------------------------------------------------------------- data losses 1-3
def test_index_out_never_deletes_a_foreign_directory_or_the_dataset(data, tmp_path):
    index = recipe_main("index")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "t.txt").write_text("x")
    with pytest.raises(UserError, match="holds no index.json"):
        index(["--data", str(data), "--method", "random", "--out", str(notes), "--overwrite"])
    assert (notes / "t.txt").read_text() == "x"
    with pytest.raises(UserError, match="the output is the --data"):
        index(["--data", str(data), "--method", "random", "--out", str(data), "--overwrite"])
    assert load_bundle(data).n_users == 6
    out = tmp_path / "index"
    index(["--data", str(data), "--method", "random", "--out", str(out)])
    with pytest.raises(UserError, match="pass --overwrite"):
        index(["--data", str(data), "--method", "random", "--out", str(out)])
    first = ItemIndex.load(out).codes
    index(["--data", str(data), "--method", "random", "--out", str(out), "--overwrite", "--seed", "1"])
    assert not np.array_equal(ItemIndex.load(out).codes, first)  # replaced


def fake_run(path: Path, data: Path, model: str = "model") -> Path:
    """A run directory as training leaves it (enough for the checks that run before any model loads)."""
    (path / model).mkdir(parents=True)
    (path / model / "config.json").write_text("{}")
    (path / "run_config.json").write_text(json.dumps({"data": str(data)}))
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    return path


def tree(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


@pytest.mark.parametrize("mode", ["--overwrite_output_dir", "--resume"])
def test_finetune_into_its_own_init_run_is_refused_and_deletes_nothing(data, tmp_path, mode):
    pre = fake_run(tmp_path / "pre", data)
    before = tree(pre)
    argv = ["--data", str(data), "--name_or_path", "tiny-llama", "--init", str(pre), "--output_dir", str(pre)]
    with pytest.raises(RunError, match="the output is the --init"):
        recipe_main("finetune")([*argv, mode])
    assert tree(pre) == before


def test_overwrite_output_dir_deletes_nothing_in_a_folder_that_is_not_a_run(data, tmp_path):
    folder = tmp_path / "mine"
    for name in ("model/weights.bin", "metrics.json", "tensorboard/events"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("mine")
    before = tree(folder)
    argv = ["--data", str(data), "--name_or_path", "tiny-llama", "--output_dir", str(folder)]
    with pytest.raises(RunError, match="no run_config.json: not a run directory"):
        recipe_main("pretrain")([*argv, "--overwrite_output_dir"])
    assert tree(folder) == before


def test_a_run_directory_another_process_trains_into_is_refused(data, tmp_path):
    out = tmp_path / "run"
    with Lock(out):  # another training run holds it
        with pytest.raises(RunError, match=r"another process \(pid \d+\) is writing it now"):
            recipe_main("pretrain")(
                ["--data", str(data), "--name_or_path", "tiny-llama", "--output_dir", str(out)]
            )
    assert not out.exists()


def test_two_builds_into_one_out_cannot_both_proceed(tmp_path):
    out = tmp_path / "bundle"
    with Lock(out):
        with pytest.raises(DataError, match="another process"):
            csv_bundle(tmp_path, 6, out)
    assert not out.exists()


def test_finetune_init_of_a_run_without_model_is_one_line(data, tmp_path):
    pre = fake_run(tmp_path / "pre", data, model="checkpoints")
    argv = ["--data", str(data), "--name_or_path", "tiny-llama", "--init", str(pre)]
    with pytest.raises(RunError, match="has no model/ yet"):
        recipe_main("finetune")([*argv, "--output_dir", str(tmp_path / "ft")])
    assert not (tmp_path / "ft").exists()


def test_export_overwrite_takes_only_a_recommender_bundle(data, tmp_path):
    run = fake_run(tmp_path / "ft", data, model="best")
    before = tree(run)
    export = recipe_main("export")
    with pytest.raises(UserError, match="the output lies inside the --run"):
        export(["--run", str(run), "--out", str(run / "best"), "--overwrite"])
    hf_model = tmp_path / "hf"
    hf_model.mkdir()
    (hf_model / "config.json").write_text('{"model_type": "llama"}')
    (hf_model / "model.safetensors").write_text("weights")
    with pytest.raises(UserError, match="holds no config.json of a recommender bundle"):
        export(["--run", str(run), "--out", str(hf_model), "--overwrite"])
    assert tree(run) == before and tree(hf_model) == ["config.json", "model.safetensors"]


def test_save_pretrained_overwrite_takes_only_a_recommender_bundle(recommender, tmp_path):
    hf_model = tmp_path / "hf"
    hf_model.mkdir()
    (hf_model / "config.json").write_text('{"model_type": "llama"}')
    (hf_model / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="holds no config.json of a recommender bundle"):
        recommender.save_pretrained(hf_model, overwrite=True)
    assert tree(hf_model) == ["config.json", "tokenizer.json"]
    bundle = recommender.save_pretrained(tmp_path / "bundle")
    assert recommender.save_pretrained(bundle, overwrite=True) == bundle


# ------------------------------------------------------------------------------------------- runtime errors
def test_a_full_disk_during_build_is_one_line_and_keeps_the_old_bundle(tmp_path):
    """``ulimit -f`` (RLIMIT_FSIZE) in a real ``python -m data_prep build --overwrite``: exit 2, one line."""
    import resource
    import subprocess
    import sys

    out = csv_bundle(tmp_path, 6, tmp_path / "bundle")
    source = tmp_path / "big.csv"
    rows = "".join(f"u{u},i{(u + k) % 50},{10 * k},a review {u} {k}\n" for u in range(300) for k in range(20))
    source.write_text("user_id,item_id,timestamp,review\n" + rows)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    argv = ["--format", "csv", "--input", str(source), "--time_col", "timestamp", "--text_col", "review"]
    done = subprocess.run(
        [sys.executable, "-m", "data_prep", "build", *argv, "--out", str(out), "--overwrite"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=limit,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [errors[0]] and "File too large (disk full or file size limit?)" in errors[0]
    assert load_bundle(out).n_users == 6
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")) == []


def test_a_cut_last_line_of_metrics_is_dropped_on_resume_and_a_damaged_one_is_named(tmp_path):
    from llmrec.run import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "loss/fin')
    truncate_metrics(tmp_path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        truncate_metrics(tmp_path, 2)


def test_a_run_whose_best_model_save_was_killed_is_evaluated_with_best(data, tmp_path):
    """run_model_dir (evaluate, export, align) finishes the interrupted replace before choosing."""
    from llmrec.run import run_model_dir

    model = model_for(load_bundle(data), ModelConfig(lora_r=4), BackboneConfig("tiny-llama"))
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    model.save_pretrained(run / "best")
    kill_during(run / "best", 3, lambda: model.save_pretrained(run / "best"))  # best/ is aside now
    assert not (run / "best").exists()
    assert run_model_dir(run) == run / "best"
