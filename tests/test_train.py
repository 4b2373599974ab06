"""The accelerate training loop on a tiny backbone and the real ML-100K bundle.

Kill-and-resume and the two-process run are real subprocesses (SIGKILL, `accelerate launch`); they
compare against in-process runs of the same recipe.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

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
