"""The accelerate training loop on a tiny backbone and the real ML-100K bundle.

Kill-and-resume and the two-process run are real subprocesses (SIGKILL, `accelerate launch`); they
compare against in-process runs of the same recipe.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
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
sys.path.insert(0, str(REPO / "recipes"))
import pretrain  # noqa: E402

TINY = [
    "--name_or_path",
    "tiny-llama",
    "--lora_r",
    "4",
    "--max_doc_tokens",
    "64",
    "--log_steps",
    "1",
    "--warmup_ratio",
    "0",
]


def run_args(bundle: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(bundle), "--output_dir", str(out), *TINY, *extra]


def losses(run: Path, task: str = "collaborative") -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row[f"loss/{task}"] for row in rows if f"loss/{task}" in row]


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **extra}


def test_pretraining_learns_collaborative_structure(ml100k_bundle, tmp_path):
    from data_prep import load_bundle

    run = tmp_path / "run"
    pretrain.main(
        run_args(ml100k_bundle, run, "--corpora", "collaborative", "--max_steps", "200", "--batch_size", "32")
        + ["--max_doc_tokens", "32", "--lr", "1e-3", "--embedding_lr", "1e-2", "--scheduler", "constant"]
        + ["--mutual_reg", "0", "--log_steps", "20"]
    )
    curve = losses(run)
    uniform = math.log(1682)
    assert curve[0] > uniform - 0.6
    assert np.mean(curve[-3:]) < uniform - 1.0, curve

    # items watched together by 20+ users end up closer than random pairs (cosine around the mean item)
    weights = load_file(run / "model" / "model.safetensors")
    table = next(v for k, v in weights.items() if k.startswith("collab.") and k.endswith("item.weight"))
    table = torch.nn.functional.normalize(table - table.mean(0), dim=-1)
    train = load_bundle(ml100k_bundle).matrix("train")
    co = (train.T @ train).tocoo()
    rng = np.random.default_rng(0)
    upper = np.flatnonzero((co.row < co.col) & (co.data >= 20))
    pairs = rng.choice(upper, 2000, replace=False)
    together = (table[co.row[pairs]] * table[co.col[pairs]]).sum(-1).mean()
    random_pairs = rng.integers(0, table.shape[0], (2, 2000))
    apart = (table[random_pairs[0]] * table[random_pairs[1]]).sum(-1).mean()
    assert together > apart + 0.1, (float(together), float(apart))


def test_kill_and_resume_ends_exactly_like_an_uninterrupted_run(
    ml100k_bundle, tmp_path, kill_after_checkpoint
):
    common = ["--max_steps", "24", "--batch_size", "8", "--save_steps", "3", "--lora_dropout", "0.1"]
    reference = tmp_path / "reference"
    pretrain.main(run_args(ml100k_bundle, reference, *common))

    killed = tmp_path / "killed"
    kill_after_checkpoint(
        [str(REPO / "recipes" / "pretrain.py"), *run_args(ml100k_bundle, killed, *common)],
        killed,
        "checkpoint_6",
    )
    state = json.loads((killed / "checkpoints" / "checkpoint_6" / "trainer_state.json").read_text())
    assert state["step"] < 24 and not (killed / "model").exists()

    pretrain.main(run_args(ml100k_bundle, killed, *common, "--resume"))
    expected = load_file(reference / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def launch_two_cpu_processes(launch_args: list[str], run: list[str], **env: str) -> None:
    """``accelerate launch`` the pretraining recipe on two CPU processes (one core each)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *launch_args,
            str(REPO / "recipes" / "pretrain.py"),
            *run,
        ],
        env=subprocess_env(OMP_NUM_THREADS="1", **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_loss_curves(single: Path, other: Path) -> None:
    for task in ("collaborative", "content"):
        one, two = losses(single, task), losses(other, task)
        assert len(one) == len(two) > 0
        np.testing.assert_allclose(two, one, rtol=1e-4)


SPARSE_HASHED = ["--user_table", "hashed", "--user_buckets", "64", "--sparse_updates", "true"]


@pytest.mark.parametrize("tables", [[], SPARSE_HASHED], ids=["full", "hashed-sparse"])
def test_two_processes_follow_the_single_process_loss_curve(ml100k_bundle, tmp_path, tables):
    """Also with sparse hashed user rows: DDP (gloo) reduces their sparse gradients like dense ones."""
    common = ["--max_steps", "6", "--batch_size", "8", "--lora_dropout", "0", *tables]
    single = tmp_path / "single"
    pretrain.main(run_args(ml100k_bundle, single, *common))

    double = tmp_path / "double"
    launch = ["--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no"]
    launch_two_cpu_processes([*launch, "--dynamo_backend", "no"], run_args(ml100k_bundle, double, *common))
    assert_same_loss_curves(single, double)


def test_fsdp_config_follows_the_single_process_loss_curve_and_resumes(ml100k_bundle, tmp_path):
    """recipes/accelerate/fsdp.yaml on two CPU processes: FSDP2 shards, same losses, resumable checkpoints.

    accelerate starts FSDP on CPU only with ACCELERATE_USE_CPU (its ``--cpu`` flag bypasses the FSDP
    launcher) and then needs llmrec.train's promotion to FSDP (see ``_fsdp_on_cpu``).
    """
    common = ["--max_steps", "6", "--batch_size", "8", "--lora_dropout", "0", "--save_steps", "3"]
    common += ["--save_total_limit", "3"]
    single = tmp_path / "single"
    pretrain.main(run_args(ml100k_bundle, single, *common))

    fsdp = tmp_path / "fsdp"
    launch = ["--config_file", str(REPO / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", "2"]
    launch_two_cpu_processes(launch, run_args(ml100k_bundle, fsdp, *common), ACCELERATE_USE_CPU="true")
    assert_same_loss_curves(single, fsdp)
    step3 = fsdp / "checkpoints" / "checkpoint_3"
    assert json.loads((step3 / "trainer_state.json").read_text())["step"] == 3
    assert (step3 / "pytorch_model_fsdp_0").is_dir()  # sharded (torch.distributed.checkpoint), not one file

    # resume from the step-3 checkpoint: the run ends with the uninterrupted run's weights
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, resumed / "checkpoints" / "checkpoint_3")
    launch_two_cpu_processes(
        launch, run_args(ml100k_bundle, resumed, *common, "--resume"), ACCELERATE_USE_CPU="true"
    )
    expected = load_file(fsdp / "model" / "model.safetensors")
    got = load_file(resumed / "model" / "model.safetensors")
    assert expected.keys() == got.keys() == load_file(single / "model" / "model.safetensors").keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_config_files_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "recipes" / "accelerate" / f"{name}.yaml"))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    assert config.distributed_type == expected
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_qlora_trains_lora_on_a_4bit_backbone(ml100k_bundle, tmp_path):
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "qlora"
    pretrain.main(run_args(ml100k_bundle, run, "--load_in_4bit", "--max_steps", "3", "--batch_size", "8"))
    from llmrec.model import CLLM4Rec

    model = CLLM4Rec.from_pretrained(run / "model")
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized, "the backbone was not loaded in 4 bit"
    weights = load_file(run / "model" / "model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: it trained
    assert all(math.isfinite(x) for x in losses(run))


# ---------------------------------------------------------------------- train: bad input and failures
TINY_RUN = ["--name_or_path", "tiny-llama", "--lora_r", "4", "--max_doc_tokens", "48", "--batch_size", "8"]
TINY_RUN += ["--warmup_ratio", "0", "--log_steps", "1"]


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


def pretrain_run(bundle: Path, out: Path, *extra: str, tiny: list[str] = TINY_RUN):
    return recipe("pretrain")(["--data", str(bundle), "--output_dir", str(out), *tiny, *extra])


# ------------------------------------------------------------------------------------------------ checkpoints
def test_kill_inside_a_checkpoint_save_keeps_the_good_one_and_resumes_from_it(
    bundle, tmp_path, monkeypatch, capsys
):
    """A save interrupted half-way (here: an exception right after accelerate wrote a damaged optimizer
    file, which like kill -9 skips everything after it) is never visible as a checkpoint, is not counted
    against save_total_limit, and --resume continues from the newest complete one, exactly."""
    common = ["--max_steps", "9", "--save_steps", "3", "--save_total_limit", "1", "--lora_dropout", "0.1"]
    pretrain_run(bundle, tmp_path / "reference", *common)

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
        pretrain_run(bundle, run, *common)
    monkeypatch.undo()
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".checkpoint_6.tmp", "checkpoint_3"]
    (checkpoints / "checkpoint_7").mkdir()  # as left in place by an interrupted save of older versions

    with pytest.raises(RunError, match="holds a previous run"):  # refused up front, not after training
        pretrain_run(bundle, run, *common)
    capsys.readouterr()
    pretrain_run(bundle, run, *common, "--resume")
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
    pretrain_run(bundle, tmp_path / "run", "--max_steps", "1")
    pretrain_run(bundle, tmp_path / "run", "--max_steps", "2", "--overwrite_output_dir")
    assert [
        json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2]


def test_resume_without_a_complete_checkpoint_says_so(bundle, tmp_path, capsys):
    pretrain_run(bundle, tmp_path / "run", "--max_steps", "1", "--resume")
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
    pretrain_run(bundle, run, "--max_steps", "1")
    harm(run / "checkpoints" / "checkpoint_1" / name)
    with pytest.raises(RunError, match=message) as info:
        pretrain_run(bundle, run, "--max_steps", "2", "--resume")
    assert str(run / "checkpoints" / "checkpoint_1" / name) in str(info.value)


def test_finetune_init_from_another_bundle_is_refused_before_training(bundle, tmp_path):
    pretrain_run(bundle, tmp_path / "pre", "--max_steps", "1")
    other = write_log(tmp_path / "other", 20, 31, titles=True)
    out = tmp_path / "fine"
    argv = ["--data", str(other), "--init", str(tmp_path / "pre"), "--output_dir", str(out), *TINY_RUN]
    with pytest.raises(DataError, match="built for 20 users and 30 items, this dataset bundle has 20 and 31"):
        recipe("finetune")(argv)
    assert not (out / "checkpoints").exists()


def test_bundle_without_item_text_pretrains_and_says_content_is_skipped(tmp_path, capsys):
    plain = write_log(tmp_path / "plain", 12, 20, titles=False)
    pretrain_run(plain, tmp_path / "run", "--max_steps", "2")
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
    at = TINY_RUN.index(f"--{field}") if f"--{field}" in TINY_RUN else len(TINY_RUN)
    tiny = TINY_RUN[:at] + TINY_RUN[at + 2 :]  # the command line would win over the file
    with pytest.raises(ConfigError) as info:  # a type the parser refuses too, not argparse's SystemExit
        pretrain_run(bundle, tmp_path / "run", "--config", str(config), *cli, tiny=tiny)
    assert f"field {field!r}" in str(info.value) or f"--{field}" in str(info.value)
    assert message in str(info.value)
    assert (str(config) in str(info.value)) == (where == "yaml")
    assert not (tmp_path / "run" / "run_config.json").exists()


def test_unknown_key_is_refused(bundle, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lrr: 0.1\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['lrr'\] in section 'train'"):
        pretrain_run(bundle, tmp_path / "run", "--config", str(config))


def test_max_doc_tokens_without_room_for_content_is_refused(bundle, tmp_path):
    with pytest.raises(ConfigError, match="'max_doc_tokens' 3 leaves no room for content text"):
        pretrain_run(bundle, tmp_path / "run", "--max_doc_tokens", "3")
