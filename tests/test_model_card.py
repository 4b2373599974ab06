"""The model card an export writes into the bundle (`llmrec.model_card`): read from the run's artefacts."""

from __future__ import annotations

import json
import shutil

from test_recommender import data, run  # noqa: F401  (fixtures)

from llmrec.bundle import read_config
from llmrec.export import export_run
from llmrec.metrics import write_metrics_json


def test_export_writes_a_model_card_with_the_runs_metrics(run, tmp_path):  # noqa: F811
    copy = shutil.copytree(run, tmp_path / "run")
    test = {"recall@20": 0.123456, "ndcg@20": 0.0654321, "recall@40": 0.2}
    write_metrics_json(copy / "metrics.json", {"test": test}, run=str(copy))
    bundle = export_run(copy, tmp_path / "bundle")
    card = (bundle / "README.md").read_text()
    assert "README.md" in read_config(bundle)["files"]  # checksummed like every other file
    assert "| test | 0.1235 | 0.2000 | 0.0654 |" in card
    evals = [
        json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines() if '"eval/' in line
    ]
    if evals:
        best = max(evals, key=lambda e: e["eval/recall@20"])
        assert f"valid (during training, step {best['step']})" in card
    assert "Full ranking over the whole catalogue" in card and "recipes/serve.py --bundle" in card
    assert "tiny-llama" in card and "30 users, 40 items" in card and "task=multinomial" in card


def test_a_run_never_evaluated_says_so(run, tmp_path):  # noqa: F811
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "metrics.jsonl").write_text("")
    (copy / "metrics.json").unlink(missing_ok=True)
    card = (export_run(copy, tmp_path / "bundle") / "README.md").read_text()
    assert "No evaluation is recorded in the run" in card
