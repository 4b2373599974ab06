"""Quality on the fixed ML-100K split: an llmrec recipe over several seeds beside Pop, EASE and Mult-VAE.

    python benchmarks/quality_ml100k.py [--config recipes/configs/ml-100k-cpu.yaml] [--seeds 42,43,44]
        [--variant NAME ...] [--reuse] [--out benchmarks/results/quality_ml100k.json]

For every seed and variant it runs pretrain -> finetune with the config (a variant adds finetuning
flags: one lever switched off, for the ablation), then scores the test users once and reports two rows
from that one run: the **pure LLM** (the LM's item head alone) and, when the config blends a
collaborative prior, the **hybrid** (LM + prior, weight chosen on valid). Pop, EASE and Mult-VAE (one
fit per seed) use the same bundle and metric code. The table is mean ± std over the seeds in CLLM4Rec's
recall convention (hits / min(K, |held-out|)); RecBole's hits / |held-out| is recall_recbole@K in the
JSON. A PNG beside the JSON shows validation Recall@20 by epoch for each variant and the test metrics
with error bars. Nothing is chosen on test. ``--reuse`` keeps runs that already finished (their
directories under ``--runs``), so seeds can be run in separate processes and gathered at the end.
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

import baselines  # noqa: E402
import finetune  # noqa: E402
import pretrain  # noqa: E402

from common.config import read_yaml  # noqa: E402
from common.log import setup_logging  # noqa: E402
from data_prep import load_bundle  # noqa: E402
from data_prep.build import build_ml100k_reference  # noqa: E402
from llmrec.metrics import evaluate_scorer, format_table, write_metrics_json  # noqa: E402
from llmrec.pipeline import blend_prior, scorer_for  # noqa: E402
from llmrec.reporting import machine_info  # noqa: E402
from llmrec.run import PRIOR_FILE, run_model  # noqa: E402
from llmrec.scoring import PrecomputedScorer  # noqa: E402

METRICS = ["recall@20", "recall@40", "ndcg@20", "ndcg@100", "recall_recbole@20"]
COLUMNS = [*METRICS, "train_s"]
# one lever of the chosen recipe switched off at a time (finetuning flags on top of the config)
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "no pooled history": ["--history_pool", "none"],
    "target all, 20% masked": ["--target", "all", "--mask_ratio", "0.2"],
    "shuffled prompts": ["--prompt_order", "shuffled"],
}


def run_seed(config: str, seed: int, variant: str, runs: Path, reuse: bool) -> dict:
    """Pretrain (shared by the variants of a seed) and finetune one variant; test metrics of both heads."""
    pre, fine = (
        runs / f"seed{seed}" / "pretrain",
        runs / f"seed{seed}" / variant.replace(" ", "_").replace(",", ""),
    )
    timings: dict[str, float] = {}
    common = ["--config", config, "--seed", str(seed)]
    if not (reuse and (pre / "model" / "config.json").exists()):
        start = time.perf_counter()
        pretrain.main([*common, "--output_dir", str(pre), "--overwrite_output_dir"])
        timings["pretrain_s"] = time.perf_counter() - start
    bundle = load_bundle(read_yaml(config)["data"])
    if not (reuse and (fine / "model" / "config.json").exists()):  # model/ is written when training ends
        start = time.perf_counter()
        finetune.main(
            [
                *common,
                "--init",
                str(pre),
                "--output_dir",
                str(fine),
                "--overwrite_output_dir",
                *VARIANTS[variant],
            ]
        )
        timings["finetune_s"] = time.perf_counter() - start
    model = run_model(fine)
    if model.head.has_prior and not (fine / PRIOR_FILE).exists():  # stopped before the blend
        blend_prior(bundle, fine, batch_size=16)
        model = run_model(fine)
    start = time.perf_counter()
    result = {"seed": seed, "variant": variant, "run": str(fine), **timings}
    result["valid_recall@20_by_epoch"] = [
        row["eval/recall@20"]
        for row in map(json.loads, (fine / "metrics.jsonl").read_text().splitlines())
        if "eval/recall@20" in row
    ]
    scorer, users = scorer_for(bundle, model, batch_size=16, split="test"), np.arange(bundle.n_users)
    if not model.head.has_prior:
        scores = {"llm": scorer.score(users)}
    else:
        logits, prior = scorer.parts(users)
        scores = {"llm": logits, "hybrid": model.head.blend(logits, prior)}
        result["prior_weight"] = model.head.blend_weight
    for name, matrix in scores.items():
        result[name] = evaluate_scorer(PrecomputedScorer(matrix, users), bundle, "test", progress=False)
    result["evaluate_s"] = time.perf_counter() - start
    return result


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean and sample std of every metric over seeds."""
    out: dict[str, float] = {}
    for key in rows[0]:
        values = np.array([row[key] for row in rows], dtype=float)
        timed = values[~np.isnan(values)]  # a reused run has no train time
        out[key] = float(timed.mean()) if len(timed) else float("nan")
        out[f"{key}_std"] = float(timed.std(ddof=1)) if len(timed) > 1 else 0.0
    return out


def cell(summary: dict[str, float], key: str) -> str:
    return f"{summary[key]:.4f} ± {summary[key + '_std']:.4f}"


def plot(path: Path, runs: list[dict], table: dict[str, dict[str, float]]) -> None:
    """Validation Recall@20 by epoch (one line per run) and test metrics with error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.5))
    colours = {variant: f"C{i}" for i, variant in enumerate(VARIANTS)}
    for run in runs:
        label = f"{run['variant']} (seed {run['seed']})"
        curve = run["valid_recall@20_by_epoch"]
        curves.plot(range(1, len(curve) + 1), curve, marker=".", color=colours[run["variant"]], label=label)
    curves.set(
        xlabel="finetuning epoch", ylabel="valid Recall@20 (LM head alone)", title="validation by epoch"
    )
    curves.legend(fontsize=7)
    names, width = list(table), 0.8 / len(table)
    for i, name in enumerate(names):
        means = [table[name][m] for m in METRICS[:4]]
        stds = [table[name][m + "_std"] for m in METRICS[:4]]
        bars.bar(np.arange(4) + i * width, means, width, yerr=stds, capsize=3, label=name)
    bars.set_xticks(np.arange(4) + 0.4 - width / 2, METRICS[:4])
    bars.set(ylabel="test (mean ± std over seeds)", title="ML-100K fixed random split, test")
    bars.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def measure(args: argparse.Namespace, seeds: list[int]) -> tuple[list[dict], dict[str, list[dict]]]:
    """Run the LLM recipe (and variants) and fit the baselines for every seed: (runs, rows per model)."""
    data = Path(read_yaml(args.config)["data"])
    build_ml100k_reference(Path(args.shared), data, exist_ok=True)
    runs = []
    if not args.skip_llm:
        for variant in args.variant or ["recipe"]:
            runs += [run_seed(args.config, seed, variant, Path(args.runs), args.reuse) for seed in seeds]
    per_model: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        train_s = run.get("pretrain_s", np.nan) + run.get("finetune_s", np.nan)  # nan: a reused run
        for head, label in (("llm", "pure LLM"), ("hybrid", "LLM + EASE prior")):
            if head in run:
                row = {m: run[head][m] for m in METRICS} | {"train_s": train_s}
                per_model.setdefault(f"llmrec {label} [{run['variant']}]", []).append(row)
    for seed in seeds:
        fitted = baselines.main(["--data", str(data), "--split", "test", "--seed", str(seed)])
        for name, metrics in fitted.items():
            per_model.setdefault(name, []).append(
                {m: metrics[m] for m in METRICS} | {"train_s": metrics["fit_s"]}
            )
    return runs, per_model


def gather(files: list[str]) -> tuple[list[int], list[dict], dict[str, list[dict]]]:
    """Seeds, runs and per-seed rows of earlier result files, each written for its own seeds."""
    seeds, runs, per_model = [], [], {}
    for path in files:
        result = json.loads(Path(path).read_text())
        if len(result["seeds"]) != 1:
            raise SystemExit(f"{path}: --gather takes result files of one seed each")
        seeds += result["seeds"]
        runs += result["runs"]
        for name, row in result["metrics"].items():
            per_model.setdefault(name, []).append({key: row[key] for key in COLUMNS})
    return seeds, runs, per_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "ml-100k-cpu.yaml"))
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated seeds (LLM runs and Mult-VAE)")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="default: recipe only")
    parser.add_argument(
        "--runs", default=str(REPO / "runs" / "quality_ml100k"), help="where runs are written"
    )
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished")
    parser.add_argument("--skip_llm", action="store_true", help="baselines only")
    parser.add_argument(
        "--gather",
        nargs="+",
        metavar="JSON",
        help="only combine result files of earlier runs of this script (e.g. one per seed) into one table",
    )
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality_ml100k.json"))
    args = parser.parse_args()
    setup_logging()
    if args.gather:
        seeds, runs, per_model = gather(args.gather)
    else:
        seeds = [int(s) for s in args.seeds.split(",")]
        runs, per_model = measure(args, seeds)
    table = {name: summarise(rows) for name, rows in per_model.items()}
    print(f"ML-100K fixed random split, test, mean ± std over seeds {seeds}; config {args.config}")
    print(format_table({name: {m: cell(s, m) for m in COLUMNS} for name, s in table.items()}, COLUMNS))
    out = Path(args.out)
    write_metrics_json(
        out,
        table,
        seeds=seeds,
        runs=runs,
        config_file=args.config,
        config=read_yaml(args.config),
        machine=machine_info(),
    )
    if runs:
        plot(
            out.with_suffix(".png"),
            runs,
            {k: v for k, v in table.items() if "[recipe]" in k or k in ("ease", "multvae")},
        )


if __name__ == "__main__":
    main()
