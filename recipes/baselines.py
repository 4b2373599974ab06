"""Classical baselines (Pop, EASE, Mult-VAE) on a dataset bundle, scored like the LLM recommender.

    python recipes/baselines.py --data DIR --split test [--models pop,ease,multvae] [--out results.json]

Every model is fit on the training split, with hyperparameters (EASE's lambda, Mult-VAE's epoch) chosen on
the validation split by NDCG@100. The input history at scoring time is the training matrix, as in the LLM
recommender's prompt. With ``--split test``, training and validation items are excluded from the rankings;
with ``--split valid``, training items (and the numbers are optimistic: they were tuned on that split).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from common.log import setup_logging
from data_prep import load_bundle
from llmrec.baselines import EASE, make_baseline
from llmrec.config import parse_config, to_dict
from llmrec.metrics import evaluate_scorer, format_table, write_metrics_json
from llmrec.reporting import machine_info

logger = logging.getLogger("recipes.baselines")

COLUMNS = ["recall@20", "recall@40", "ndcg@20", "ndcg@100", "recall_recbole@20", "recall_recbole@40", "fit_s"]


@dataclass
class BaselineArgs:
    section: ClassVar[str] = "baselines"  # its YAML section (llmrec.config)
    data: str = field(
        default="data/ml-100k",
        metadata={"help": "dataset bundle directory written by `python -m data_prep build`"},
    )
    split: str = field(default="test", metadata={"help": "split to report: test or valid"})
    models: str = field(default="pop,ease,multvae", metadata={"help": "comma-separated: pop, ease, multvae"})
    out: str | None = field(default=None, metadata={"help": "JSON file for all metrics (written atomically)"})
    eval_batch_size: int = field(default=1024, metadata={"help": "users per scoring batch"})
    device: str | None = field(
        default=None, metadata={"help": "Mult-VAE device (default: cuda when available)"}
    )


@dataclass
class EASEArgs:
    section: ClassVar[str] = "ease"  # its YAML section (llmrec.config)
    lambdas: list[float] = field(
        default_factory=lambda: list(EASE.DEFAULT_LAMBDAS), metadata={"help": "EASE L2 grid, chosen on valid"}
    )


@dataclass
class MultVAEArgs:
    section: ClassVar[str] = "multvae"  # its YAML section (llmrec.config)
    epochs: int = field(default=200, metadata={"help": "maximum Mult-VAE epochs"})
    patience: int = field(default=50, metadata={"help": "epochs without valid NDCG@100 gain before stopping"})
    batch_size: int = field(default=500, metadata={"help": "users per Mult-VAE update"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    anneal_cap: float = field(default=0.2, metadata={"help": "largest KL weight beta"})
    anneal_steps: int | None = field(
        default=None,
        metadata={"help": "updates for beta to grow by 1 (default: reach the cap halfway through)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of Mult-VAE (Pop and EASE are deterministic)"})


# what this recipe parses; the first is its own YAML section
CONFIGS = (BaselineArgs, EASEArgs, MultVAEArgs)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    setup_logging()
    args, ease, multvae = parse_config(*CONFIGS, args=argv)
    options = {
        "ease": {"lambdas": ease.lambdas},
        "multvae": {**asdict(multvae), "device": args.device, "progress": True},
    }
    if args.split not in ("valid", "test"):
        raise SystemExit(f"--split must be valid or test, got {args.split!r}")
    bundle = load_bundle(args.data)
    train, valid = bundle.matrix("train"), bundle.matrix("valid")
    rows: dict[str, dict[str, float]] = {}
    fit_info: dict[str, dict] = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = make_baseline(name, **options.get(name, {}))
        start = time.perf_counter()
        model.fit(train, valid)
        fit_s = time.perf_counter() - start
        logger.info("%s fit in %.1f s: %s", name, fit_s, model.fit_info)
        metrics = evaluate_scorer(model, bundle, args.split, batch_size=args.eval_batch_size)
        rows[name] = {**metrics, "fit_s": fit_s}
        fit_info[name] = model.fit_info
    print(f"{args.split} split of {args.data} (history: train; hyperparameters chosen on valid)")
    print(format_table(rows, COLUMNS))
    if args.out:
        write_metrics_json(
            args.out,
            rows,
            config=to_dict(args, ease, multvae),
            fit_info=fit_info,
            history="train",
            machine=machine_info(),
        )
        logger.info("wrote %s", args.out)
    return rows


if __name__ == "__main__":
    main()
