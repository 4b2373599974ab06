"""Classical baselines (Pop, EASE, Mult-VAE, SASRec, Random, content kNN) on a dataset bundle, scored like the LLM.

    python recipes/baselines.py --data DIR --split test [--models pop,ease,multvae,sasrec,random,knn] [--out results.json]

On a cold-items bundle every model gets two rows, the whole catalogue (``all``) and the split's cold
items only (``cold``); models that cannot score an item without interactions (EASE, Mult-VAE; Pop has
no signal for them) say so instead of a cold row. The zero-shot LM scorer is ``recipes/zeroshot.py``.

Every model is fit on the training split, with hyperparameters (EASE's lambda, Mult-VAE's epoch by
NDCG@100; SASRec's epoch and dropout by NDCG@10) chosen on the validation split. The input history at
scoring time is the training split, as in the LLM recommender's prompt, plus the validation item for the
test split of a leave-one-out bundle (`llmrec.metrics.history_splits`). With ``--split test``, training
and validation items are excluded from the rankings; with ``--split valid``, training items (and the
numbers are optimistic: they were tuned on that split); ``--exclude_seen false`` keeps them.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from common.errors import run_cli
from common.log import setup_logging
from llmrec.config import parse_config, require, to_dict
from llmrec.options import BASELINE_NAMES, EASE_LAMBDAS, EvalConfig, Split, require_seed

if TYPE_CHECKING:
    import scipy.sparse as sp

    from data_prep import Bundle
    from llmrec.baselines import Baseline, SASRec
    from llmrec.metrics import Scorer

logger = logging.getLogger("recipes.baselines")

COLUMNS = ["recall@20", "recall@40", "ndcg@20", "ndcg@100", "recall_recbole@20", "recall_recbole@40", "fit_s"]
LOO_COLUMNS = ["hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "fit_s"]


@dataclass
class BaselineArgs:
    section: ClassVar[str] = "baselines"  # its YAML section (llmrec.config)
    former: ClassVar[dict[str, str]] = {"eval_batch_size": "eval.batch_size"}  # before EvalConfig
    data: str = field(
        default="data/ml-100k",
        metadata={"help": "dataset bundle directory written by `python -m data_prep build`"},
    )
    split: Split = field(default="test", metadata={"help": "split to report"})
    models: str = field(
        default="pop,ease,multvae", metadata={"help": f"comma-separated, of {', '.join(BASELINE_NAMES)}"}
    )
    exclude_seen: bool = field(
        default=True, metadata={"help": "exclude training (and for test, validation) items from the rankings"}
    )
    encoder: str = field(
        default="minilm", metadata={"help": "text encoder of the content kNN (cached in DATA/embeddings)"}
    )
    out: str | None = field(default=None, metadata={"help": "JSON file for all metrics (written atomically)"})
    device: str | None = field(
        default=None, metadata={"help": "Mult-VAE / SASRec device (default: cuda when available)"}
    )

    def __post_init__(self) -> None:
        unknown = [name for name in self.names() if name not in BASELINE_NAMES]
        require(not unknown and self.names(), "models", self.models, f"must name some of {BASELINE_NAMES}")

    def names(self) -> list[str]:
        return [name.strip() for name in self.models.split(",") if name.strip()]


@dataclass
class BaselineEvalConfig(EvalConfig):
    """`EvalConfig` with the baselines' scoring batch: cheap rows, so more users at a time."""

    batch_size: int = field(default=1024, metadata={"help": "users per scoring batch"})


@dataclass
class EASEArgs:
    section: ClassVar[str] = "ease"  # its YAML section (llmrec.config)
    lambdas: list[float] = field(
        default_factory=lambda: list(EASE_LAMBDAS), metadata={"help": "EASE L2 grid, chosen on valid"}
    )

    def __post_init__(self) -> None:
        require(bool(self.lambdas) and min(self.lambdas) > 0, "lambdas", self.lambdas, "must be positive")


@dataclass
class MultVAEArgs:
    section: ClassVar[str] = "multvae"  # its YAML section (llmrec.config)
    epochs: int = field(default=200, metadata={"help": "maximum Mult-VAE epochs"})
    patience: int = field(
        default=50,
        metadata={"help": "epochs without valid NDCG@100 gain before stopping (0: never stop early)"},
    )
    batch_size: int = field(default=500, metadata={"help": "users per Mult-VAE update"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    anneal_cap: float = field(default=0.2, metadata={"help": "largest KL weight beta"})
    anneal_steps: int | None = field(
        default=None,
        metadata={"help": "updates for beta to grow by 1 (default: reach the cap halfway through)"},
    )
    seed: int = field(
        default=0,
        metadata={"help": "seed of Mult-VAE, also used by Random (Pop, EASE and kNN are deterministic)"},
    )

    def __post_init__(self) -> None:
        require_seed(self.seed)
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.patience >= 0, "patience", self.patience, "must be >= 0")
        for name in ("epochs", "batch_size"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")


def knn_embeddings(bundle, args: BaselineArgs) -> np.ndarray:
    """Item text embeddings of the content kNN, cached in the bundle directory."""
    from llmrec.coldstart import item_texts
    from llmrec.indexing.encoders import item_embeddings  # loads a text encoder: only when kNN runs

    texts = item_texts(bundle.item_titles, bundle.item_text)
    return item_embeddings(texts, args.encoder, cache_dir=Path(args.data) / "embeddings")


@dataclass
class SASRecArgs:
    """SASRec's options (``sasrec: {epochs: 40}``, ``--sasrec.epochs 40``); the ``sasrec_`` names of
    llmrec 0.2 (``--sasrec_epochs``, a ``sasrec_epochs`` key) still work."""

    section: ClassVar[str] = "sasrec"  # its YAML section (llmrec.config)
    max_len: int = field(default=200, metadata={"help": "most recent items read"})
    hidden: int = field(default=64, metadata={"help": "embedding and hidden size"})
    blocks: int = field(default=2, metadata={"help": "self-attention blocks"})
    dropouts: list[float] = field(
        default_factory=lambda: [0.2, 0.5], metadata={"help": "dropout grid, chosen on valid"}
    )
    epochs: int = field(default=200, metadata={"help": "maximum epochs"})
    patience: int = field(
        default=10,
        metadata={"help": "epochs without valid NDCG@10 gain before stopping (0: never stop early)"},
    )
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    batch_size: int = field(default=128, metadata={"help": "users per update"})
    seed: int = field(default=0, metadata={"help": "seed"})
    windows: bool = field(
        default=False, metadata={"help": "train on every max_len window of a sequence, not only its newest"}
    )

    def __post_init__(self) -> None:
        require_seed(self.seed)
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.patience >= 0, "patience", self.patience, "must be >= 0")
        require(all(0 <= d < 1 for d in self.dropouts), "dropouts", self.dropouts, "must be in [0, 1)")
        for name in ("max_len", "hidden", "blocks", "epochs", "batch_size"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")


SASRecArgs.former = {f"sasrec_{f.name}": f"sasrec.{f.name}" for f in fields(SASRecArgs)}


# what this recipe parses; the first is its own YAML section
CONFIGS = (BaselineArgs, EASEArgs, MultVAEArgs, SASRecArgs, BaselineEvalConfig)


class FoldIn:
    """A fitted baseline scoring users from input histories other than the training ones it keeps
    (`Baseline.score_rows`), e.g. training + validation items for a leave-one-out test split."""

    def __init__(self, model: Baseline | SASRec, histories: list[list[int]]) -> None:
        self.model, self.histories = model, histories

    def score(self, users: np.ndarray) -> np.ndarray:
        from llmrec.baselines import SASRec, sequence_matrix

        rows = [self.histories[int(u)] for u in users]
        if isinstance(self.model, SASRec):
            return self.model.score_rows(rows)
        return self.model.score_rows(sequence_matrix(rows, self.model.n_items))


def fit_scorer(
    model: Baseline | SASRec, bundle: Bundle, split: str, fit_on: sp.csr_matrix | None = None
) -> Scorer:
    """Fit ``model`` on the bundle's training split, or on ``fit_on`` (training rows without the cold
    users), selecting on valid, and return its scorer for ``split``: the model itself (scoring every
    user's training rows, cold users' given history included), or a `FoldIn` of the input histories
    when they hold more than the training items (`llmrec.metrics.history_splits`) or when SASRec was
    fit without the cold users' sequences."""
    from llmrec.baselines import SASRec
    from llmrec.metrics import history_splits
    from llmrec.pipeline import input_histories

    if isinstance(model, SASRec):
        sequences = bundle.histories("train")
        if fit_on is not None:  # the users fit_on leaves out train on nothing
            kept = np.diff(fit_on.indptr) > 0
            sequences = [items if kept[user] else [] for user, items in enumerate(sequences)]
        model.fit(sequences, bundle.n_items, bundle.matrix("valid"))
    else:
        model.fit(bundle.matrix("train") if fit_on is None else fit_on, bundle.matrix("valid"))
        model.history = bundle.matrix("train")
    if history_splits(bundle, split) == ("train",) and not (isinstance(model, SASRec) and fit_on is not None):
        return model
    return FoldIn(model, input_histories(bundle, split))


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    setup_logging()
    args, ease, multvae, sasrec, eval_config = parse_config(*CONFIGS, args=argv)
    # the model stack loads after parsing, so --help and argument errors answer at once
    import scipy.sparse as sp

    from data_prep import load_bundle
    from data_prep.cold import cold_ids
    from llmrec.baselines import UNSEEN_ITEMS, make_baseline
    from llmrec.metrics import (
        evaluate_cold_items,
        evaluate_scorer,
        format_table,
        history_splits,
        is_leave_one_out,
        write_metrics_json,
    )
    from llmrec.reporting import machine_info

    options = {
        "ease": lambda: {"lambdas": ease.lambdas},
        "multvae": lambda: {**asdict(multvae), "device": args.device, "progress": True},
        "sasrec": lambda: {**asdict(sasrec), "device": args.device, "progress": True},
        "random": lambda: {"seed": multvae.seed},
        "knn": lambda: {"embeddings": knn_embeddings(bundle, args)},
    }
    bundle = load_bundle(args.data)
    rows: dict[str, dict[str, float]] = {}
    fit_info: dict[str, dict] = {}
    cold = cold_ids(bundle.manifest, "items", args.split)
    fit_on = None
    cold_users = cold_ids(bundle.manifest, "users")
    if len(cold_users):  # a cold user's history is the input at scoring time, never fit on
        keep = np.ones(bundle.n_users, dtype=np.float32)
        keep[cold_users] = 0.0
        fit_on = sp.csr_matrix(sp.diags(keep) @ bundle.matrix("train"))
    for name in args.names():
        model = make_baseline(name, **options.get(name, dict)())
        start = time.perf_counter()
        scorer = fit_scorer(model, bundle, args.split, fit_on)
        fit_s = time.perf_counter() - start
        logger.info("%s fit in %.1f s: %s", name, fit_s, model.fit_info)
        fit_info[name] = model.fit_info
        if not len(cold):
            metrics = evaluate_scorer(
                scorer, bundle, args.split, batch_size=eval_config.batch_size, exclude_seen=args.exclude_seen
            )
            rows[name] = {**metrics, "fit_s": fit_s}
            continue
        views = evaluate_cold_items(scorer, bundle, args.split, cold, batch_size=eval_config.batch_size)
        rows[f"{name} (all)"] = {**views["all"], "fit_s": fit_s}
        if name in UNSEEN_ITEMS:
            fit_info[name]["cold"] = UNSEEN_ITEMS[name]
            logger.info("%s on cold items: %s", name, UNSEEN_ITEMS[name])
        else:
            rows[f"{name} (cold)"] = {**views["cold"], "fit_s": fit_s}
    inputs = "+".join(history_splits(bundle, args.split))
    print(f"{args.split} split of {args.data} (history: {inputs}; hyperparameters chosen on valid)")
    print(format_table(rows, LOO_COLUMNS if is_leave_one_out(bundle) else COLUMNS))
    for name, info in fit_info.items():
        if "cold" in info:
            print(f"{name} (cold): {info['cold']}")
    if args.out:
        write_metrics_json(
            args.out,
            rows,
            config=to_dict(args, ease, multvae, sasrec, eval_config),
            fit_info=fit_info,
            history=inputs,
            exclude_seen=args.exclude_seen,
            machine=machine_info(),
        )
        logger.info("wrote %s", args.out)
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
