"""Bad configs, interrupted checkpoints and damaged run directories (issue 12), on tiny-llama and a
20-user log: each is a clear error before any training, a loud warning, or correct handling."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import recipe_main as recipe
from safetensors.torch import load_file

from data_prep import DataError
from data_prep.build import BuildConfig, build
from llmrec.config import ConfigError
from llmrec.run import RunError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--name_or_path", "tiny-llama", "--lora_r", "4", "--max_doc_tokens", "48", "--batch_size", "8"]
TINY += ["--warmup_ratio", "0", "--log_steps", "1"]


def write_log(root: Path, users: int, items: int, titles: bool) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [f"u{u},i{i},{t}" for u in range(users) for t, i in enumerate(rng.choice(items, 8, replace=False))]
    (root / "log.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    meta = None
    if titles:
        (root / "items.csv").write_text("item_id,title\n" + "".join(f"i{i},Film {i}\n" for i in range(items)))
        meta = str(root / "items.csv")
    config = BuildConfig(
        format="csv",
        input=str(root / "log.csv"),
        item_meta=meta,
        time_col="timestamp",
        out=str(root / "bundle"),
    )
    return build(config)


@pytest.fixture(autouse=True)
def restore_logging():
    """The recipes call setup_logging(), which replaces the root handlers (log lines are read from
    stderr); put them back for later tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_log(tmp_path_factory.mktemp("fail-train") / "titled", 20, 30, titles=True)


def pretrain(bundle: Path, out: Path, *extra: str, tiny: list[str] = TINY):
    return recipe("pretrain")(["--data", str(bundle), "--output_dir", str(out), *tiny, *extra])


# ------------------------------------------------------------------------------------------------ checkpoints
def test_kill_inside_a_checkpoint_save_keeps_the_good_one_and_resumes_from_it(
    bundle, tmp_path, monkeypatch, capsys
):
    """A save interrupted half-way (here: an exception right after accelerate wrote a damaged optimizer
    file, which like kill -9 skips everything after it) is never visible as a checkpoint, is not counted
    against save_total_limit, and --resume continues from the newest complete one, exactly."""
    common = ["--max_steps", "9", "--save_steps", "3", "--save_total_limit", "1", "--lora_dropout", "0.1"]
    pretrain(bundle, tmp_path / "reference", *common)

    original, calls = Accelerator.save_state, []

    def dies_in_second_save(self, output_dir=None, **kw):
        calls.append(output_dir)
        location = original(self, output_dir, **kw)
        if len(calls) == 2:
            optimizer = Path(output_dir) / "optimizer.bin"
            optimizer.write_bytes(optimizer.read_bytes()[:100])
            raise RuntimeError("killed")
        return location

    run = tmp_path / "run"
    monkeypatch.setattr(Accelerator, "save_state", dies_in_second_save)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(bundle, run, *common)
    monkeypatch.undo()
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".checkpoint_6.tmp", "checkpoint_3"]
    (checkpoints / "checkpoint_7").mkdir()  # as left in place by an interrupted save of older versions

    with pytest.raises(RunError, match="holds a previous run"):  # refused up front, not after training
        pretrain(bundle, run, *common)
    capsys.readouterr()
    pretrain(bundle, run, *common, "--resume")
    assert f"resuming from {checkpoints / 'checkpoint_3'} (step 3 of 9)" in capsys.readouterr().err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_9"]
    expected, resumed = (
        load_file(tmp_path / "reference" / "model" / "model.safetensors"),
        load_file(run / "model" / "model.safetensors"),
    )
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))  # the records after step 3 were written once, by the resumed run


def test_overwrite_output_dir_starts_afresh(bundle, tmp_path):
    pretrain(bundle, tmp_path / "run", "--max_steps", "1")
    pretrain(bundle, tmp_path / "run", "--max_steps", "2", "--overwrite_output_dir")
    assert [
        json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2]


def test_resume_without_a_complete_checkpoint_says_so(bundle, tmp_path, capsys):
    pretrain(bundle, tmp_path / "run", "--max_steps", "1", "--resume")
    err = capsys.readouterr().err
    assert "--resume: no complete checkpoint" in err and "starting from step 0" in err


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage_state(path: Path) -> None:
    path.write_text("{step: oops")


def _tamper_rng(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b"torch", b"evil!"))


@pytest.mark.parametrize(
    ("name", "harm", "message"),
    [
        ("optimizer.bin", _truncate, "truncated or replaced"),
        ("trainer_state.json", _garbage_state, "not a trainer state"),
        ("random_states_0.pkl", _tamper_rng, "corrupted or edited"),
    ],
)
def test_damaged_checkpoint_is_refused_naming_the_file(bundle, tmp_path, name, harm, message):
    run = tmp_path / "run"
    pretrain(bundle, run, "--max_steps", "1")
    harm(run / "checkpoints" / "checkpoint_1" / name)
    with pytest.raises(RunError, match=message) as info:
        pretrain(bundle, run, "--max_steps", "2", "--resume")
    assert str(run / "checkpoints" / "checkpoint_1" / name) in str(info.value)


def test_finetune_init_from_another_bundle_is_refused_before_training(bundle, tmp_path):
    pretrain(bundle, tmp_path / "pre", "--max_steps", "1")
    other = write_log(tmp_path / "other", 20, 31, titles=True)
    out = tmp_path / "fine"
    argv = ["--data", str(other), "--init", str(tmp_path / "pre"), "--output_dir", str(out), *TINY]
    with pytest.raises(DataError, match="built for 20 users and 30 items, this dataset bundle has 20 and 31"):
        recipe("finetune")(argv)
    assert not (out / "checkpoints").exists()


def test_bundle_without_item_text_pretrains_and_says_content_is_skipped(tmp_path, capsys):
    plain = write_log(tmp_path / "plain", 12, 20, titles=False)
    pretrain(plain, tmp_path / "run", "--max_steps", "2")
    err = capsys.readouterr().err
    assert "the content corpus" in err and "content training is skipped" in err
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ config values
BAD_VALUES = [
    ("lr", [0.1], "must be a finite number"),
    ("lr", ".nan", "must be a finite number"),
    ("lr", -1, "must be > 0"),
    ("batch_size", 0, "must be at least 1"),
    ("batch_size", -4, "must be at least 1"),
    ("epochs", 0, "must be at least 1"),
    ("max_doc_tokens", 0, "must be at least 1"),
    ("lora_r", "four", "must be an integer"),
]
SECTION = {
    "lr": "train",
    "batch_size": "train",
    "epochs": "train",
    "max_doc_tokens": "model",
    "lora_r": "model",
}


@pytest.mark.parametrize("where", ["yaml", "cli"])
@pytest.mark.parametrize(("field", "value", "message"), BAD_VALUES)
def test_bad_config_value_is_refused_naming_the_field(bundle, tmp_path, field, value, message, where):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({SECTION[field]: {field: value}}) if where == "yaml" else "{}")
    cli = [] if where == "yaml" else [f"--{field}", json.dumps(value).strip('"')]
    if where == "cli" and isinstance(value, list):
        pytest.skip("argparse takes one value per flag")
    at = TINY.index(f"--{field}") if f"--{field}" in TINY else len(TINY)
    tiny = TINY[:at] + TINY[at + 2 :]  # the command line would win over the file
    with pytest.raises(ConfigError) as info:  # a type the parser refuses too, not argparse's SystemExit
        pretrain(bundle, tmp_path / "run", "--config", str(config), *cli, tiny=tiny)
    assert f"field {field!r}" in str(info.value) or f"--{field}" in str(info.value)
    assert message in str(info.value)
    assert (str(config) in str(info.value)) == (where == "yaml")
    assert not (tmp_path / "run" / "run_config.json").exists()


def test_unknown_key_is_refused(bundle, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lrr: 0.1\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['lrr'\] in section 'train'"):
        pretrain(bundle, tmp_path / "run", "--config", str(config))


def test_max_doc_tokens_without_room_for_content_is_refused(bundle, tmp_path):
    with pytest.raises(ConfigError, match="'max_doc_tokens' 3 leaves no room for content text"):
        pretrain(bundle, tmp_path / "run", "--max_doc_tokens", "3")
