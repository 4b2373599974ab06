"""The accelerate training loop on a tiny backbone and the real ML-100K bundle.

Kill-and-resume and the two-process run are real subprocesses (SIGKILL, `accelerate launch`); they
compare against in-process runs of the same recipe.
"""

from __future__ import annotations

import json
import math
import os
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
        [str(REPO / "recipes" / "pretrain.py"), *run_args(ml100k_bundle, killed, *common)], killed
    )
    state = json.loads((killed / "checkpoints" / "checkpoint_1" / "trainer_state.json").read_text())
    assert state["step"] < 24 and not (killed / "model").exists()

    pretrain.main(run_args(ml100k_bundle, killed, *common, "--resume"))
    expected = load_file(reference / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_follow_the_single_process_loss_curve(ml100k_bundle, tmp_path):
    common = ["--max_steps", "6", "--batch_size", "8", "--lora_dropout", "0"]
    single = tmp_path / "single"
    pretrain.main(run_args(ml100k_bundle, single, *common))

    double = tmp_path / "double"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--cpu",
        "--num_machines",
        "1",
    ]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run(
        [*launch, str(REPO / "recipes" / "pretrain.py"), *run_args(ml100k_bundle, double, *common)],
        env=subprocess_env(OMP_NUM_THREADS="1"),  # one core per process
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for task in ("collaborative", "content"):
        one, two = losses(single, task), losses(double, task)
        assert len(one) == len(two) > 0
        np.testing.assert_allclose(two, one, rtol=1e-4)


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
