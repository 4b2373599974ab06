"""``benchmarks/gpu_check.sh --smoke``: the GPU check's whole path (accelerate launch, pretraining and
finetuning for a fixed number of steps, evaluation, the JSON) on CPU with a tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("benchmark_gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_flops_by_device_name():
    peak = gpu_check_module().peak_flops
    assert peak("NVIDIA H100 80GB HBM3") == 989.4e12  # SXM
    assert peak("NVIDIA H100 PCIe") == 756.5e12
    assert peak("NVIDIA H100 NVL") == 835.5e12
    assert peak("NVIDIA H200") == 989.4e12
    assert peak("NVIDIA GeForce RTX 4090") is None


def test_smoke_run_measures_every_stage(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_CHECK_WORK": str(tmp_path / "work"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU") and report["peak_gpu_memory_mb"] is None
    for stage in ("pretrain", "finetune"):
        assert report["stages"][stage]["tokens_per_s"] > 0
        assert report["stages"][stage]["fraction_of_peak"] is None  # no GPU, no peak to divide by
    assert report["parameters_without_input_embeddings"] > 0
    assert 0 <= report["test_metrics"]["ndcg@10"] <= 1
    assert "tokens/s" in result.stdout and "peak GPU memory" in result.stdout


def test_unknown_argument_is_refused():
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--stpes", "3"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "unknown argument --stpes" in result.stderr
