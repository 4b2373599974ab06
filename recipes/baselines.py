"""Classical baselines (Pop, EASE, Mult-VAE, SASRec) on a dataset bundle, scored like the LLM recommender.

    python recipes/baselines.py --data DIR --split test [--models pop,ease,multvae,sasrec] [--out results.json]

Every model is fit on the training split, with hyperparameters (EASE's lambda, Mult-VAE's epoch by
NDCG@100; SASRec's epoch and dropout by NDCG@10) chosen on the validation split. The input history at
scoring time is the training split, as in the LLM recommender's prompt, plus the validation item for the
test split of a leave-one-out bundle (`llmrec.metrics.history_splits`). With ``--split test``, training
and validation items are excluded from the rankings; with ``--split valid``, training items (and the
numbers are optimistic: they were tuned on that split); ``--exclude_seen false`` keeps them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from data_prep import load_bundle
from llmrec.baselines import EASE, make_baseline
from llmrec.config import parse_config, to_dict
from llmrec.data import train_histories
from llmrec.log import setup_logging
from llmrec.metrics import (
    evaluate_scorer,
    format_table,
    history_splits,
    is_leave_one_out,
    split_matrix,
    write_metrics_json,
)
from llmrec.reporting import machine_info

logger = logging.getLogger("recipes.baselines")

COLUMNS = ["recall@20", "recall@40", "ndcg@20", "ndcg@100", "recall_recbole@20", "recall_recbole@40", "fit_s"]
LOO_COLUMNS = ["hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "fit_s"]


@dataclass
class BaselineArgs:
    data: str = field(
        default="data/ml-100k",
        metadata={"help": "dataset bundle directory written by `python -m data_prep build`"},
    )
    split: str = field(default="test", metadata={"help": "split to report: test or valid"})
    models: str = field(
        default="pop,ease,multvae", metadata={"help": "comma-separated: pop, ease, multvae, sasrec"}
    )
    exclude_seen: bool = field(
        default=True, metadata={"help": "exclude training (and for test, validation) items from the rankings"}
    )
    out: str | None = field(default=None, metadata={"help": "JSON file for all metrics (written atomically)"})
    seed: int = field(
        default=0, metadata={"help": "seed for Mult-VAE and SASRec (Pop and EASE are deterministic)"}
    )
    eval_batch_size: int = field(default=1024, metadata={"help": "users per scoring batch"})
    ease_lambdas: list[float] = field(
        default_factory=lambda: list(EASE.DEFAULT_LAMBDAS), metadata={"help": "EASE L2 grid, chosen on valid"}
    )
    multvae_epochs: int = field(default=200, metadata={"help": "maximum Mult-VAE epochs"})
    multvae_patience: int = field(
        default=50, metadata={"help": "epochs without valid NDCG@100 gain before stopping"}
    )
    multvae_batch_size: int = field(default=500, metadata={"help": "users per Mult-VAE update"})
    multvae_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    multvae_anneal_cap: float = field(default=0.2, metadata={"help": "largest KL weight beta"})
    multvae_anneal_steps: int | None = field(
        default=None,
        metadata={"help": "updates for beta to grow by 1 (default: reach the cap halfway through)"},
    )
    sasrec_max_len: int = field(default=200, metadata={"help": "SASRec: most recent items read"})
    sasrec_hidden: int = field(default=64, metadata={"help": "SASRec: embedding and hidden size"})
    sasrec_blocks: int = field(default=2, metadata={"help": "SASRec: self-attention blocks"})
    sasrec_dropouts: list[float] = field(
        default_factory=lambda: [0.2, 0.5], metadata={"help": "SASRec: dropout grid, chosen on valid"}
    )
    sasrec_epochs: int = field(default=200, metadata={"help": "SASRec: maximum epochs"})
    sasrec_patience: int = field(
        default=10, metadata={"help": "SASRec: epochs without valid NDCG@10 gain before stopping"}
    )
    sasrec_lr: float = field(default=1e-3, metadata={"help": "SASRec: Adam learning rate"})
    sasrec_batch_size: int = field(default=128, metadata={"help": "SASRec: users per update"})
    device: str | None = field(
        default=None, metadata={"help": "Mult-VAE / SASRec device (default: cuda when available)"}
    )


def model_kwargs(args: BaselineArgs, name: str) -> dict:
    if name == "ease":
        return {"lambdas": args.ease_lambdas}
    if name == "multvae":
        return {
            "epochs": args.multvae_epochs,
            "patience": args.multvae_patience,
            "batch_size": args.multvae_batch_size,
            "lr": args.multvae_lr,
            "anneal_cap": args.multvae_anneal_cap,
            "anneal_steps": args.multvae_anneal_steps,
            "seed": args.seed,
            "device": args.device,
            "progress": True,
        }
    if name == "sasrec":
        return {
            "max_len": args.sasrec_max_len,
            "hidden": args.sasrec_hidden,
            "blocks": args.sasrec_blocks,
            "dropouts": args.sasrec_dropouts,
            "epochs": args.sasrec_epochs,
            "patience": args.sasrec_patience,
            "lr": args.sasrec_lr,
            "batch_size": args.sasrec_batch_size,
            "seed": args.seed,
            "device": args.device,
            "progress": True,
        }
    return {}


def fit_scorer(model, bundle, split: str) -> Callable[[np.ndarray], np.ndarray]:
    """Fit ``model`` on the bundle's training split (selecting on valid) and return its scorer for ``split``:
    matrix models read the users' input-history rows, SASRec their input sequences, oldest first."""
    inputs = history_splits(bundle, split)
    if getattr(model, "sequential", False):
        model.fit(train_histories(bundle), bundle.n_items, bundle.matrix("valid"))
        sequences = train_histories(bundle, inputs)
        return lambda users: model.score(users, sequences)
    model.fit(bundle.matrix("train"), bundle.matrix("valid"))
    history = split_matrix(bundle, inputs)
    return lambda users: model.score(users, history)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    setup_logging()
    (args,) = parse_config(BaselineArgs, args=argv, section="baselines")
    if args.split not in ("valid", "test"):
        raise SystemExit(f"--split must be valid or test, got {args.split!r}")
    bundle = load_bundle(args.data)
    rows: dict[str, dict[str, float]] = {}
    fit_info: dict[str, dict] = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = make_baseline(name, **model_kwargs(args, name))
        start = time.perf_counter()
        scorer = fit_scorer(model, bundle, args.split)
        fit_s = time.perf_counter() - start
        logger.info("%s fit in %.1f s: %s", name, fit_s, model.fit_info)
        metrics = evaluate_scorer(
            scorer, bundle, args.split, batch_size=args.eval_batch_size, exclude_seen=args.exclude_seen
        )
        rows[name] = {**metrics, "fit_s": fit_s}
        fit_info[name] = model.fit_info
    inputs = "+".join(history_splits(bundle, args.split))
    print(f"{args.split} split of {args.data} (history: {inputs}; hyperparameters chosen on valid)")
    print(format_table(rows, LOO_COLUMNS if is_leave_one_out(bundle) else COLUMNS))
    if args.out:
        write_metrics_json(
            args.out,
            rows,
            config=to_dict(args),
            fit_info=fit_info,
            history=inputs,
            exclude_seen=args.exclude_seen,
            machine=machine_info(),
        )
        logger.info("wrote %s", args.out)
    return rows


if __name__ == "__main__":
    main()
