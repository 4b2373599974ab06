"""Alignment of the item head on ML-100K leave-one-out: DPO, S-DPO and GRPO against their SFT start, per seed.

    python benchmarks/align_ml100k.py --stage sft --seeds 42                 # the SFT start per seed
    python benchmarks/align_ml100k.py --stage align --seeds 42 --methods sdpo,grpo
    python benchmarks/align_ml100k.py --stage report                         # table, JSON and PNG

The stages run apart so that a shared machine can run two jobs at a time (one seed's SFT beside another
seed's alignment). ``sft`` finetunes the sequential item head (``recipes/finetune.py --config``, plus
``--sft_args``); ``align`` runs ``recipes/align.py`` from it with each method's arguments (``METHODS``,
``--align_args`` for all, ``--tag`` to name a variant while choosing on valid); ``report`` evaluates every
run found on test (``recipes/evaluate.py``, cached in the run's ``metrics.json``), takes its valid NDCG@10
from the run's own records (the SFT run's prior-weight choice, the alignment run's validation) and writes
the table (markdown), the JSON (per seed: valid and test before and after) and a PNG of valid and test
NDCG@10 before/after per seed and method. Hyper-parameters are chosen on valid only; test is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import align  # noqa: E402
import evaluate  # noqa: E402
import finetune  # noqa: E402

from common.config import read_yaml  # noqa: E402
from common.log import setup_logging  # noqa: E402
from data_prep.build import build_ml100k_reference  # noqa: E402
from llmrec.metrics import write_metrics_json  # noqa: E402
from llmrec.reporting import machine_info  # noqa: E402

# each method's recipes/align.py arguments on top of the config's align section
METHODS = {
    "dpo": ["--loss", "dpo"],
    "sdpo": ["--loss", "sdpo", "--n_rejected", "8", "--n_random", "8"],
    "grpo": ["--loss", "grpo", "--grpo_group", "8", "--grpo_length", "10", "--kl_weight", "0.05"],
}
SHOWN = ("hr@10", "ndcg@10", "ndcg@20")  # test columns


def sft_run(args, seed: int) -> Path:
    return Path(args.runs) / f"sequential-seed{seed}"


def run_sft(args, seed: int) -> None:
    out = sft_run(args, seed)
    finetune.main(
        ["--config", args.config, "--seed", str(seed), "--output_dir", str(out), "--overwrite_output_dir"]
        + args.sft_args.split()
    )


def run_align(args, seed: int, method: str) -> None:
    out = Path(args.runs) / f"{method}{args.tag}-seed{seed}"
    align.main(
        ["--config", args.config, "--seed", str(seed), "--init", str(sft_run(args, seed))]
        + ["--output_dir", str(out), "--overwrite_output_dir", *METHODS[method], *args.align_args.split()]
    )


def evaluated(args, run: Path, split: str, *extra: str) -> dict:
    """The run's metrics on ``split`` (``extra``: more recipes/evaluate.py arguments), from its
    metrics.json when an earlier report evaluated it."""
    key = split + "".join(
        f"/{flag.lstrip('-')}={value}" for flag, value in zip(extra[::2], extra[1::2], strict=True)
    )
    saved = run / "metrics.json"
    if saved.exists() and key in json.loads(saved.read_text())["metrics"]:
        return json.loads(saved.read_text())["metrics"][key]
    return evaluate.main(["--config", args.config, "--run", str(run), "--split", split, *extra])


def lm_alone_valid_ndcg(args, run: Path) -> float:
    """Valid NDCG@10 of the item head without the prior (weight 0): what alignment changed, unblended."""
    prior = run / "prior_weight.json"
    if prior.exists():  # the SFT run scored weight 0 when it chose its weight
        return json.loads(prior.read_text())["valid"]["ndcg@10"]["0.0"]
    return evaluated(args, run, "valid", "--prior_weight", "0")["ndcg@10"]


def valid_ndcg(run: Path) -> float:
    """The valid NDCG@10 the run was selected by: an SFT run's at its prior weight (chosen on valid after
    training, `prior_weight.json`), else the best of its validations (an alignment run validates with the
    SFT run's prior weight; without a prior, the LM alone)."""
    prior = run / "prior_weight.json"
    if prior.exists():  # the weight was chosen as the grid's best
        return max(json.loads(prior.read_text())["valid"]["ndcg@10"].values())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(row["eval/ndcg@10"] for row in rows if "eval/ndcg@10" in row)


def wall_s(run: Path) -> float:
    """Seconds from a run's start (its run_config.json) to its last logged line (metrics.jsonl)."""
    return (run / "metrics.jsonl").stat().st_mtime - (run / "run_config.json").stat().st_mtime


def collect(args) -> dict[str, dict[int, dict]]:
    """{name: {seed: {"valid": {"ndcg@10"}, "test": metrics, "wall_s": s}}} for the SFT start and every
    finished alignment run (a run counts once it has kept a model)."""
    results: dict[str, dict[int, dict]] = {}
    for run in sorted(Path(args.runs).glob("*-seed*")):
        name, seed = run.name.rsplit("-seed", 1)
        if not (run / "model" / "config.json").exists():
            continue
        if int(seed) not in args.seed_list:
            continue
        valid = {"ndcg@10": valid_ndcg(run)}
        if args.lm_alone:
            valid["ndcg@10 LM alone"] = lm_alone_valid_ndcg(args, run)
        row = {"valid": valid, "test": evaluated(args, run, "test"), "wall_s": wall_s(run)}
        results.setdefault(name, {})[int(seed)] = row
    return results


def summary(results: dict[str, dict[int, dict]], lm_alone: bool = False) -> tuple[list[str], dict]:
    """Markdown table lines (mean ± std over seeds, and per-seed change from the SFT start) and its JSON."""
    start = results.get("sequential", {})
    columns = (
        [("valid", "ndcg@10")] + [("valid", "ndcg@10 LM alone")] * lm_alone + [("test", m) for m in SHOWN]
    )
    header = ["run", "seeds"] + [f"{split} {m}" for split, m in columns]
    header += ["valid ndcg@10 Δ per seed", "test ndcg@10 Δ per seed", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    table = {}
    for name, seeds in results.items():
        order = sorted(seeds)
        cells, row = [name, ",".join(str(s) for s in order)], {"seeds": order}
        for split, metric in columns:
            values = np.array([seeds[s][split].get(metric, np.nan) for s in order])
            row[f"{split}/{metric}"] = values.tolist()
            std = f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.4f}{std}")
        for split in ("valid", "test"):
            deltas = [seeds[s][split]["ndcg@10"] - start[s][split]["ndcg@10"] for s in order if s in start]
            row[f"{split}/ndcg@10_delta"] = deltas
            cells.append(" ".join(f"{d:+.4f}" for d in deltas) if name != "sequential" else "")
        cells.append(f"{np.mean([seeds[s]['wall_s'] for s in order]):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
        table[name] = row
    return lines, table


def plot(results: dict[str, dict[int, dict]], path: Path) -> None:
    """Valid and test NDCG@10 of the SFT start and of every alignment run, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    seeds = sorted(results.get("sequential", {}))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    width = 0.8 / max(1, len(names))
    for ax, split in zip(axes, ("valid", "test"), strict=True):
        for k, name in enumerate(names):
            values = [results[name].get(s, {}).get(split, {}).get("ndcg@10", np.nan) for s in seeds]
            ax.bar(np.arange(len(seeds)) + k * width, values, width, label=name)
        ax.set_xticks(np.arange(len(seeds)) + width * (len(names) - 1) / 2, [f"seed {s}" for s in seeds])
        ax.set_title(f"{split} NDCG@10")
        low = min(results[n][s][split]["ndcg@10"] for n in names for s in seeds if s in results[n])
        ax.set_ylim(low * 0.9, None)
    axes[0].legend(fontsize=8)
    fig.suptitle("ML-100K leave-one-out: item head before (sequential = SFT) and after alignment")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=("sft", "align", "report"), required=True)
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "ml-100k-loo-cpu.yaml"))
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--methods", default="sdpo,grpo", help=f"any of {sorted(METHODS)}")
    parser.add_argument("--sft_args", default="", help="more recipes/finetune.py arguments")
    parser.add_argument("--align_args", default="", help="more recipes/align.py arguments (every method)")
    parser.add_argument(
        "--lm_alone", action="store_true", help="report: also valid NDCG@10 at prior weight 0 (one more pass)"
    )
    parser.add_argument("--tag", default="", help="suffix of the alignment run names (a variant)")
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "align_ml100k"))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "align_ml100k"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "images" / "align_ml100k.png"))
    args = parser.parse_args()
    setup_logging()
    build_ml100k_reference(
        Path(args.shared), Path(read_yaml(args.config)["data"]), "ml-100k-loo", exist_ok=True
    )
    args.seed_list = seeds = [int(s) for s in args.seeds.split(",")]
    if args.stage == "sft":
        for seed in seeds:
            run_sft(args, seed)
    elif args.stage == "align":
        for seed in seeds:
            for method in args.methods.split(","):
                run_align(args, seed, method)
    else:
        results = collect(args)
        lines, table = summary(results, args.lm_alone)
        out = Path(args.results)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text("\n".join(lines) + "\n")
        write_metrics_json(out / "align.json", {"per_seed": results, "summary": table}, machine=machine_info(),
                           config_file=args.config, config=read_yaml(args.config), args=vars(args))  # fmt: skip
        plot(results, Path(args.plot))
        print("\n".join(lines))
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
