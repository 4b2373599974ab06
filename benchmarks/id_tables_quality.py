"""The user-table options (`llmrec.id_tables`) on the quality and next-item recipes of ML-100K.

    python benchmarks/id_tables_quality.py --recipe quality|next [--tables full,none,hashed,lowrank]
        [--seeds 42] [--splits valid,test] [--epochs N] [--reuse] [--out benchmarks/results/id_tables_RECIPE.json]

For every option and seed it trains the recipe (`quality`: `recipes/configs/ml-100k-cpu.yaml`, pretrain
then finetune on the random split; `next`: `recipes/configs/ml-100k-loo-cpu.yaml`, the sequential item
head on the leave-one-out split) with the option's user table on top of the config, then evaluates the
kept model on each of ``--splits``, from one LM pass per split (as `quality_ml100k.py`): the hybrid at the
blend weight chosen on valid (what `recipes/evaluate.py` reports) and the LM alone (prior weight 0).
Options are chosen on ``valid``; test is reported beside it.
``--epochs`` caps the finetuning epochs (to fit the shared CPU; the JSON records it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import finetune  # noqa: E402
import pretrain  # noqa: E402

from common.config import read_yaml  # noqa: E402
from common.log import setup_logging  # noqa: E402
from data_prep import load_bundle  # noqa: E402
from data_prep.build import build_ml100k_reference  # noqa: E402
from llmrec.metrics import evaluate_scorer  # noqa: E402
from llmrec.pipeline import FINETUNE_TASKS, scorer_for  # noqa: E402
from llmrec.reporting import machine_info  # noqa: E402
from llmrec.run import run_data, run_model, run_task  # noqa: E402
from llmrec.scoring import PrecomputedScorer  # noqa: E402

# each option's flags on top of the recipe (ML-100K has 943 users: 256 buckets x 2 hashes, rank 32)
TABLES: dict[str, list[str]] = {
    "full": [],
    "none": ["--user_table", "none"],
    "hashed": ["--user_table", "hashed", "--user_buckets", "256", "--user_hashes", "2"],
    "lowrank": ["--user_table", "lowrank", "--user_rank", "32"],
}
EVAL_FILE = "id_tables_eval.json"  # a run's evaluations, beside its model
RECIPES = {  # config, shared split, whether it pretrains, metrics reported
    "quality": ("recipes/configs/ml-100k-cpu.yaml", "ml-100k-random", True, ("recall@20", "ndcg@20")),
    "next": ("recipes/configs/ml-100k-loo-cpu.yaml", "ml-100k-loo", False, ("hr@10", "ndcg@10")),
}


def train_run(recipe: str, table: str, seed: int, runs: Path, epochs: list[str], reuse: bool) -> Path:
    config, _, pretrains, _ = RECIPES[recipe]
    common = ["--config", config, "--seed", str(seed), "--overwrite_output_dir", *TABLES[table]]
    run = runs / recipe / f"{table}-seed{seed}"
    if reuse and (run / "finetune" / "model" / "config.json").exists():
        return run
    init = []
    if pretrains:
        pretrain.main([*common, "--output_dir", str(run / "pretrain")])
        init = ["--init", str(run / "pretrain")]
    finetune.main([*common, *init, "--output_dir", str(run / "finetune"), *epochs])
    return run


def evaluation(run: Path, split: str) -> dict[str, dict]:
    """Metrics of ``run``'s kept model on ``split``, both heads from one LM pass: ``hybrid`` (the prior at
    the weight chosen on valid, what `recipes/evaluate.py` reports) and ``lm`` (prior weight 0)."""
    model = run_model(run)
    bundle = load_bundle(run_data(run))
    users = np.arange(bundle.n_users)
    scorer = scorer_for(bundle, model, batch_size=16, split=split, prompt=FINETUNE_TASKS[run_task(run)])
    if not model.head.has_prior:
        scores = {"lm": scorer.score(users)}
    else:
        logits, prior = scorer.parts(users)
        scores = {"lm": logits, "hybrid": model.head.blend(logits, prior)}
    return {
        view: evaluate_scorer(PrecomputedScorer(matrix, users), bundle, split, progress=False)
        for view, matrix in scores.items()
    }


def cached_evaluation(run: Path, split: str, reuse: bool) -> dict[str, dict]:
    """:func:`evaluation`, kept in ``run/id_tables_eval.json`` so that ``--reuse`` gathers without a pass."""
    path = run / EVAL_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    if not (reuse and split in saved):
        saved[split] = evaluation(run, split)
        path.write_text(json.dumps(saved, indent=2))
    return saved[split]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=list(RECIPES), required=True)
    parser.add_argument("--tables", default=",".join(TABLES))
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--splits", default="valid,test")
    parser.add_argument("--epochs", type=int, default=None, help="cap on the finetuning epochs")
    parser.add_argument("--runs", default="runs/id_tables")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs and their evaluations")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    config, split_name, _, metrics = RECIPES[args.recipe]
    build_ml100k_reference(REPO.parent / "shared", read_yaml(config)["data"], split_name, exist_ok=True)
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    results: dict[str, list[dict]] = {}
    for table in args.tables.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            run = train_run(args.recipe, table, seed, Path(args.runs), epochs, args.reuse)
            train_s = time.perf_counter() - start
            row: dict = {"seed": seed, "train_s": train_s}
            for split in args.splits.split(","):
                for view, split_metrics in cached_evaluation(run / "finetune", split, args.reuse).items():
                    row[f"{split} {view}"] = split_metrics
            results.setdefault(table, []).append(row)
    table_rows = {}
    for table, rows in results.items():
        cells = {}
        for head in (f"{split} {view}" for split in args.splits.split(",") for view in ("hybrid", "lm")):
            if head not in rows[0]:
                continue
            for metric in metrics:
                values = np.array([row[head][metric] for row in rows])
                std = values.std(ddof=1) if len(values) > 1 else 0.0
                cells[f"{head} {metric}"] = f"{values.mean():.4f} ± {std:.4f}"
        table_rows[table] = cells
    print(f"{args.recipe} recipe, seeds {args.seeds}")
    for table, cells in table_rows.items():
        print(table, "  ".join(f"{k} {v}" for k, v in cells.items()))
    out = Path(args.out or f"benchmarks/results/id_tables_{args.recipe}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": args.recipe,
        "config": config,
        "splits": args.splits,
        "epochs_cap": args.epochs,
        "tables": {t: TABLES[t] for t in results},
        "machine": machine_info(),
        "runs": results,
        "table": table_rows,
    }
    out.write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
