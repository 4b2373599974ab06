"""Export and the Recommender API under bad weights, damaged bundles and bad arguments (issue 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_config_errors import LOG, TINY, one_line_error, recipe

from data_prep.build import BuildConfig, build
from llmrec.bundle import BundleError
from llmrec.export import export_run
from llmrec.recommender import Recommender
from llmrec.run import run_model_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fail-export")
    (root / "log.csv").write_text(LOG)
    bundle = build(BuildConfig(format="csv", input=str(root / "log.csv"), out=str(root / "bundle")))
    out = root / "run"
    argv = [
        "--data",
        str(bundle),
        "--output_dir",
        str(out),
        *TINY,
        "--max_steps",
        "2",
        "--with_content",
        "false",
    ]
    from test_train import recipe as in_process

    in_process("finetune")(argv)
    return out


def damaged_run(run: Path, tmp_path: Path, value: float) -> tuple[Path, str]:
    """A copy of ``run`` whose model has one weight set to ``value``; returns it and the tensor's name."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = run_model_dir(copy) / "model.safetensors"
    weights = load_file(path)
    name = next(k for k in sorted(weights) if k.startswith("collab.") and k.endswith("item.weight"))
    weights[name][0, 0] = value
    save_file(weights, path)
    return copy, name


@pytest.mark.parametrize(("value", "dtype"), [(float("nan"), "fp32"), (float("inf"), "fp32"), (1e6, "fp16")])
def test_non_finite_weights_are_refused_naming_the_tensor(run, tmp_path, value, dtype):
    copy, name = damaged_run(run, tmp_path, value)
    with pytest.raises(BundleError, match=f"tensor '{name}' has 1 non-finite value"):
        export_run(copy, tmp_path / "bundle", dtype=dtype)
    assert not (tmp_path / "bundle").exists()


def test_export_cli_refuses_non_finite_weights(run, tmp_path):
    copy, name = damaged_run(run, tmp_path, float("nan"))
    result = recipe("export", "--run", str(copy), "--out", str(tmp_path / "bundle"))
    one_line_error(result, "export.py: error:", f"tensor '{name}'", "non-finite")
    assert not (tmp_path / "bundle").exists()


def test_merged_files_are_checksummed_and_verified_on_load(run, tmp_path):
    bundle = export_run(run, tmp_path / "bundle", merge=True)
    files = json.loads((bundle / "config.json").read_text())["files"]
    merged = sorted(p.relative_to(bundle).as_posix() for p in (bundle / "merged").rglob("*") if p.is_file())
    assert merged and set(merged) <= set(files)
    target = bundle / "merged" / "item_head.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="item_head.safetensors: content differs from the sha256"):
        Recommender.from_pretrained(bundle, device="cpu")
    result = recipe("recommend", "--bundle", str(bundle), "--user", "u1", "-k", "3")
    one_line_error(result, "recommend.py: error:", "item_head.safetensors", "sha256")
    # the escape hatch for huge bundles skips the hashes (the weights it loads are not in merged/)
    assert len(Recommender.from_pretrained(bundle, device="cpu", verify=False).recommend("u1", k=3)) == 3


def test_recommend_arguments(run, tmp_path):
    recommender = Recommender.from_pretrained(export_run(run, tmp_path / "bundle"), device="cpu")
    for k in (2.5, True, "3"):
        with pytest.raises(TypeError, match="k must be a whole number"):
            recommender.recommend("u1", k=k)
    with pytest.raises(ValueError, match="neither was given"):
        recommender.recommend()
    with pytest.raises(ValueError, match="not both"):
        recommender.recommend("u1", history=["i1"])
    assert len(recommender.recommend("u1", k=torch.tensor(3).item())) == 3
