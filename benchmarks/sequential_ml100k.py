"""Next-item leave-one-out on ML-100K: Pop, EASE, SASRec and the llmrec next-item modes, side by side.

    python benchmarks/sequential_ml100k.py [--stages baselines,sequential,semantic,align,semantic_sequence,fused]
        [--seeds 0,1,2] [--llm_seeds 42] [--config recipes/configs/ml-100k-loo-cpu.yaml]
        [--sid_config recipes/configs/ml-100k-loo-sid-cpu.yaml]

Builds the bundle from ``../shared/benchmarks/ml-100k-loo`` if needed. Every stage writes its own JSON
under ``--results`` (so stages can run at different times on a shared machine); the table and the plot
of validation NDCG@10 by epoch are then made from every stage result present:

- ``baselines``: Pop and EASE (deterministic), SASRec per seed in ``--seeds`` on each user's newest
  ``--sasrec_max_len`` items (its paper's setting) and on every window of each history (the data the
  llmrec recipe trains on); per setting its dropout is chosen on valid with the first seed and reused for
  the others, its epoch by early stopping on valid;
- ``sequential``: the item head finetuned on next-item prediction (``--task sequential``) for up to
  ``--sequential_epochs``, per LLM seed;
- ``semantic``: an RQ-VAE semantic-ID index and the generator finetuned on the next item's ID
  (``--task semantic_next``), ranked by constrained beam search, with validity diagnostics;
- ``align``: DPO of each ``sequential`` run's item head against itself (``recipes/align.py``);
- ``semantic_sequence``: the generator recipe ``--sid_config`` (the history written in semantic IDs,
  every next item's codes trained in one forward per window; ``--task semantic_sequence``) for up to
  ``--sid_epochs``, ranked by constrained beam search, with validity diagnostics;
- ``fused``: each seed's item head (stage ``sequential``) and generator (stage ``semantic_sequence``)
  together, the head's scores plus a weight, chosen on valid, times the beam's log-probabilities
  (`llmrec.fused`).

Test metrics: HR@5/10/20 and NDCG@5/10/20 over the full catalogue, seen items excluded, the test prompt
holding the validation item; the models are selected on valid only. Mean ± std over the seeds run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import align  # noqa: E402
import baselines  # noqa: E402
import evaluate  # noqa: E402
import finetune  # noqa: E402
import index  # noqa: E402

from common.config import read_yaml  # noqa: E402
from common.io import write_json  # noqa: E402
from common.log import setup_logging  # noqa: E402
from data_prep.build import build_ml100k_reference  # noqa: E402
from llmrec.metrics import format_table, write_metrics_json  # noqa: E402
from llmrec.reporting import machine_info  # noqa: E402
from llmrec.run import PRIOR_FILE  # noqa: E402

METRICS = ["hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20"]
STAGES = ("baselines", "sequential", "semantic", "align", "semantic_sequence", "fused")
LM_ALONE = "llmrec item head (sequential), LM alone: prior weight 0, not the valid choice"


def valid_curve(run: Path) -> list[float]:
    """Validation NDCG@10 after every epoch of a training run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["eval/ndcg@10"] for row in rows if "eval/ndcg@10" in row]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def run_baselines(args, data: Path) -> dict:
    common = ["--data", str(data), "--split", "test"]
    rows = {}
    classical = baselines.main([*common, "--models", "pop,ease"])
    on_valid = baselines.main(["--data", str(data), "--split", "valid", "--models", "pop,ease"])
    for name, metrics in classical.items():
        rows[name] = [
            {**metrics, "wall_s": metrics["fit_s"], "curve": [], "valid_ndcg@10": on_valid[name]["ndcg@10"]}
        ]
    sasrec = [
        "--models", "sasrec", "--sasrec_max_len", str(args.sasrec_max_len), "--sasrec_lr", str(args.sasrec_lr),
        "--sasrec_epochs", str(args.sasrec_epochs), "--sasrec_patience", str(args.sasrec_patience),
    ]  # fmt: skip
    for name, stem, windows in (
        ("sasrec", "sasrec", False),
        ("sasrec (every window)", "sasrec-windows", True),
    ):
        dropouts = [str(d) for d in args.sasrec_dropouts]
        rows[name] = []
        for seed in args.seeds:
            out = Path(args.results) / f"{stem}-seed{seed}.json"  # kept: a rerun reuses finished seeds
            if not out.exists():
                seeded = ["--sasrec_dropouts", *dropouts, "--sasrec_seed", str(seed), "--out", str(out)]
                baselines.main([*common, *sasrec, *seeded, "--sasrec_windows", str(windows).lower()])
            saved = json.loads(out.read_text())
            info, metrics = saved["fit_info"]["sasrec"], saved["metrics"]["sasrec"]
            dropouts = [str(info["dropout"])]  # chosen on valid with the first seed
            curve = info["valid_ndcg@10_by_epoch"]
            rows[name].append({**metrics, "wall_s": metrics["fit_s"], "curve": curve, "seed": seed, **info})
    return rows


def run_wall(run: Path) -> float:
    """Seconds from a run's start (its run_config.json) to its last logged line (metrics.jsonl)."""
    return (run / "metrics.jsonl").stat().st_mtime - (run / "run_config.json").stat().st_mtime


def llm_run(args, seed: int, name: str, recipe, extra: list[str], config: str = "") -> tuple[Path, float]:
    """Train with ``config`` (default ``--config``), or with ``--reuse`` take a run that already kept a
    best model (e.g. one stopped by hand after the epochs that fit the machine); return it with its wall
    time."""
    run = Path(args.runs) / f"{name}-seed{seed}"
    if not (args.reuse and (run / "best" / "config.json").exists()):
        recipe.main(
            ["--config", config or args.config, "--seed", str(seed), "--output_dir", str(run)]
            + ["--overwrite_output_dir", *extra]
        )
    return run, run_wall(run)


def run_sequential(args, data: Path) -> dict:
    """The sequential item head per seed; with a prior in the config, also the LM alone (prior weight 0)
    as a diagnostic row: valid chose the blend, this shows what the blend does on test."""
    rows: dict[str, list[dict]] = {"llmrec item head (sequential)": []}
    for seed in args.llm_seeds:
        extra = ["--task", "sequential", "--epochs", str(args.sequential_epochs)]
        run, wall = llm_run(args, seed, "sequential", finetune, extra)
        test = ["--config", args.config, "--run", str(run), "--split", "test"]
        metrics = evaluate.main(test)
        rows["llmrec item head (sequential)"].append(
            {**metrics, "wall_s": wall, "curve": valid_curve(run), "seed": seed}
        )
        if (run / PRIOR_FILE).exists():  # the run blends a prior: its weight was chosen
            alone = evaluate.main([*test, "--prior_weight", "0"])
            rows.setdefault(LM_ALONE, []).append({**alone, "wall_s": wall, "curve": [], "seed": seed})
    return rows


def run_semantic(args, data: Path) -> dict:
    index_dir = data / "index" / "rqvae"
    index_wall = 0.0
    if not (index_dir / "index.json").exists():
        _, index_wall = timed(
            index.main,
            [
                "--data",
                str(data),
                "--method",
                "rqvae",
                "--out",
                str(index_dir),
                "--epochs",
                str(args.rqvae_epochs),
            ]
            + ["--codebook_size", str(args.rqvae_codebook)],
        )
    rows = []
    extra = ["--task", "semantic_next", "--index", str(index_dir), "--eval_beam", "20"]
    extra += ["--epochs", str(args.semantic_epochs)]
    for seed in args.llm_seeds:
        run, wall = llm_run(args, seed, "semantic", finetune, extra)
        metrics = evaluate.main(
            ["--config", args.config, "--run", str(run), "--split", "test", "--generate", "true"]
        )
        rows.append({**metrics, "wall_s": wall + index_wall, "curve": valid_curve(run), "seed": seed})
    return {"llmrec semantic-ID beam (next item)": rows}


def run_align(args, data: Path) -> dict:
    """DPO from each seed's SFT run: the sequential run, or ``--align_init`` (whose own test numbers are
    then reported beside it as the DPO start)."""
    rows: dict[str, list[dict]] = {"llmrec item head + DPO": []}
    for seed in args.llm_seeds:
        init = Path(args.runs) / f"sequential-seed{seed}"
        if args.align_init:
            init = Path(args.align_init.format(seed=seed))
            start = evaluate.main(["--config", args.config, "--run", str(init), "--split", "test"])
            rows.setdefault("llmrec item head, DPO start (SFT)", []).append(
                {**start, "wall_s": run_wall(init), "curve": valid_curve(init), "seed": seed}
            )
        run, wall = llm_run(args, seed, "align", align, ["--init", str(init)])
        metrics = evaluate.main(["--config", args.config, "--run", str(run), "--split", "test"])
        rows["llmrec item head + DPO"].append(
            {**metrics, "wall_s": wall, "curve": valid_curve(run), "seed": seed}
        )
    return rows


def run_semantic_sequence(args, data: Path) -> dict:
    """The semantic-ID generator recipe (``--sid_config``) per LLM seed; its index is built first if the
    recipe's ``model.index`` does not exist yet."""
    index_dir = Path(read_yaml(args.sid_config)["model"]["index"])
    index_wall = 0.0
    if not (index_dir / "index.json").exists():
        build = ["--data", str(data), "--method", "rqvae", "--out", str(index_dir)]
        _, index_wall = timed(index.main, [*build, "--codebook_size", str(args.rqvae_codebook)])
    rows = []
    for seed in args.llm_seeds:
        extra = ["--epochs", str(args.sid_epochs), *shlex.split(args.sid_args)]
        run, wall = llm_run(args, seed, "semantic_sequence", finetune, extra, config=args.sid_config)
        saved = run / "metrics.json"  # with --reuse, a test evaluation already run on it is taken
        if args.reuse and saved.exists() and "test/generate" in json.loads(saved.read_text())["metrics"]:
            metrics = json.loads(saved.read_text())["metrics"]["test/generate"]
        else:
            test = ["--config", args.sid_config, "--run", str(run), "--split", "test", "--generate", "true"]
            metrics = evaluate.main(test)
        rows.append({**metrics, "wall_s": wall + index_wall, "curve": valid_curve(run), "seed": seed})
    return {"llmrec semantic-ID generator (every position, beam 20)": rows}


def fused_scorers(bundle, head, generator, split: str) -> tuple:
    """The item head and the generator (beam 20) on ``split``, each on the prompt it was trained on."""
    from llmrec.pipeline import generative_scorer, scorer_for

    return (
        scorer_for(bundle, head, 64, split, prompt="sequence"),
        generative_scorer(bundle, generator, split, beam=20, prompt="semantic_sequence"),
    )


def run_fused(args, data: Path) -> dict:
    """Per LLM seed, that seed's sequential item head fused with its generator (`llmrec.fused`; both
    stages must have run under ``--runs``): the fusion weight chosen on valid NDCG@10, then test."""
    from data_prep import load_bundle
    from llmrec.fused import FusedScorer, choose_fusion_weight
    from llmrec.metrics import evaluate_scorer
    from llmrec.run import run_model

    bundle = load_bundle(data)
    rows = []
    for seed in args.llm_seeds:
        saved = Path(args.runs) / f"fused-seed{seed}.json"  # with --reuse, a seed fused before is taken
        if args.reuse and saved.exists():
            rows.append(json.loads(saved.read_text()))
            continue
        start = time.perf_counter()
        head = run_model(Path(args.runs) / f"sequential-seed{seed}")  # with the prior weight it chose
        generator = run_model(Path(args.runs) / f"semantic_sequence-seed{seed}")
        weight, grid = choose_fusion_weight(bundle, *fused_scorers(bundle, head, generator, "valid"))
        fused = FusedScorer(*fused_scorers(bundle, head, generator, "test"), weight)
        metrics = evaluate_scorer(fused, bundle, "test", progress=False)
        wall = time.perf_counter() - start
        rows.append(
            {**metrics, "weight": weight, "valid_grid": grid, "wall_s": wall, "curve": [], "seed": seed}
        )
        write_json(saved, rows[-1])  # atomic: a kill leaves no half-written result for --reuse
        print(f"seed {seed}: fusion weight {weight} on valid {grid}; test ndcg@10 {metrics['ndcg@10']:.4f}")
    return {"llmrec item head + generator, fused (weight on valid)": rows}


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean and std over seeds of every metric, as 'mean ± std' cells plus the raw numbers."""
    table = {}
    for name, runs in results.items():
        row = {}
        for key in [*METRICS, "wall_s"]:
            values = np.array([run[key] for run in runs], dtype=float)
            row[key] = f"{values.mean():.4f}" + (f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else "")
            if key == "wall_s":
                row[key] = f"{values.mean():.0f}"
        row["seeds"] = len(runs)
        table[name] = row
    return table


def plot(results: dict[str, list[dict]], pending: dict[str, list[float]], path: Path) -> None:
    """Left: validation NDCG@10 by epoch of every model's first seed (a dashed line for models without
    epochs), plus the curves of ``pending`` runs whose stage has no result yet. Right: test NDCG@10, mean
    with the standard deviation over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
    names = list(results)
    values = [np.array([run["ndcg@10"] for run in results[name]], dtype=float) for name in names]
    errors = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]
    bars.barh(range(len(names)), [v.mean() for v in values], xerr=errors, capsize=3, color="tab:blue")
    bars.set_yticks(range(len(names)), [f"{n[:48]} ({len(v)})" for n, v in zip(names, values, strict=True)])
    bars.tick_params(axis="y", labelsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("test NDCG@10 (mean ± std over the seeds in brackets)")
    curves = {name: runs[0]["curve"] for name, runs in results.items()} | pending
    flat_styles = iter(["--", ":", "-."])
    for name, curve in curves.items():
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, marker="." if len(curve) < 30 else None, label=name)
        elif "valid_ndcg@10" in results[name][0]:
            style = next(flat_styles, "--")
            ax.axhline(results[name][0]["valid_ndcg@10"], linestyle=style, color="gray", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.set_xscale("log")
    ax.set_title("ML-100K leave-one-out: validation NDCG@10 by epoch (first seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "ml-100k-loo-cpu.yaml"))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--seeds", default="0,1,2", help="SASRec seeds")
    parser.add_argument("--llm_seeds", default="42", help="LLM seeds")
    parser.add_argument("--sasrec_max_len", type=int, default=50)
    parser.add_argument("--sasrec_lr", type=float, default=5e-3)
    parser.add_argument("--sasrec_epochs", type=int, default=100)
    parser.add_argument("--sasrec_patience", type=int, default=10)
    parser.add_argument("--sasrec_dropouts", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument(
        "--sequential_epochs", type=int, default=3, help="item head epochs (best on valid NDCG@10 kept)"
    )
    parser.add_argument("--semantic_epochs", type=int, default=3)
    parser.add_argument(
        "--sid_config", default=str(REPO / "recipes" / "configs" / "ml-100k-loo-sid-cpu.yaml"),
        help="the semantic-ID generator recipe (stage semantic_sequence)",
    )  # fmt: skip
    parser.add_argument("--sid_epochs", type=int, default=3, help="generator epochs (best on valid kept)")
    parser.add_argument(
        "--sid_args", default="", help="more finetune flags for the generator, e.g. '--code_init title_mean'"
    )
    parser.add_argument(
        "--rqvae_epochs", type=int, default=0, help="quantized RQ-VAE epochs after the default schedule"
    )
    parser.add_argument("--rqvae_codebook", type=int, default=64, help="codes per RQ-VAE level")
    parser.add_argument(
        "--reuse", action="store_true", help="evaluate LLM runs that already kept a best model"
    )
    parser.add_argument("--align_init", default=None, help="SFT run to align, '{seed}' filled in")
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "sequential_ml100k"))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "sequential_ml100k"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "images" / "sequential_ml100k.png"))
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.llm_seeds = [int(s) for s in args.llm_seeds.split(",")]
    setup_logging()
    data = Path(read_yaml(args.config)["data"])
    build_ml100k_reference(Path(args.shared), data, "ml-100k-loo", exist_ok=True)
    results_dir = Path(args.results)
    stages = {
        "baselines": run_baselines,
        "sequential": run_sequential,
        "semantic": run_semantic,
        "align": run_align,
        "semantic_sequence": run_semantic_sequence,
        "fused": run_fused,
    }
    for stage in [s for s in args.stages.split(",") if s]:
        rows, wall = timed(stages[stage], args, data)
        write_metrics_json(results_dir / f"{stage}.json", rows, stage=stage, wall_s=wall, machine=machine_info(),
                           config_file=args.config, config=read_yaml(args.config), args=vars(args))  # fmt: skip
    results: dict[str, list[dict]] = {}
    for stage in STAGES:
        path = results_dir / f"{stage}.json"
        if path.exists():
            results.update(json.loads(path.read_text())["metrics"])
    print(f"ML-100K leave-one-out, test (selected on valid); seen items excluded; config {args.config}")
    table, columns = summarise(results), [*METRICS, "wall_s", "seeds"]
    print(format_table(table, columns))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |" for name, row in table.items()]
    (results_dir / "table.md").write_text("\n".join(lines) + "\n")  # for the README
    finished = {stage for stage in STAGES if (results_dir / f"{stage}.json").exists()}
    pending = {
        f"{run.name} (valid only: its stage has not finished)": valid_curve(run)
        for run in sorted(Path(args.runs).glob("*-seed*"))
        if run.name.split("-")[0] not in finished and (run / "metrics.jsonl").exists()
    }
    plot(results, {name: curve for name, curve in pending.items() if curve}, Path(args.plot))
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
