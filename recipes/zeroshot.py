"""Zero-shot recommendation with an untouched LM, beside popularity and random baselines on the same users.

    python recipes/zeroshot.py --data DIR --split test [--max_users N] [--name_or_path smollm2-135m]

Each user's prompt lists the titles of their input history (most recent first, truncated to fit: the
training items, plus the validation item for the test split of a leave-one-out bundle, as for every other
scorer, `llmrec.metrics.history_splits`), every
catalogue item is scored by the LM log-likelihood of its title after the prompt (``llmrec.zeroshot``),
and the rankings go through the project's metric code: training items are excluded (and validation
items for the test split). Every score variant comes from one pass: ``zeroshot-sum`` (total
log-likelihood), ``zeroshot-mean`` (per token), ``zeroshot-calibrated`` (the sum minus the title's
log-likelihood after a neutral prompt, computed once) and ``zeroshot-calibrated+pop``: the sum minus
``a`` times the neutral log-likelihood plus ``w * log(1 + training count)``, with ``(a, w)`` from
``--calibrations`` x ``--prior_weights`` chosen by NDCG@20 on the valid split of the same users (from
the same LM pass when both splits read the same input history; a second pass over the training-only
prompts for the test split of a leave-one-out bundle), or fixed by ``--calibration`` and
``--prior_weight``. ``--top_k K`` runs only the part of the title trie that the exact top-K needs
(several times less work on ML-100K); the metrics are then reported at cut-offs <= K only, for
``zeroshot-sum``, or for ``zeroshot-calibrated+pop`` when ``(a, w)`` are fixed (choose them on valid
without ``--top_k`` first). ``pop`` (training counts) and ``random`` (seeded uniform scores) are
evaluated on exactly the same users. Writes ``OUTPUT_DIR/metrics.json``.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from common.errors import run_cli
from common.log import setup_logging
from llmrec.config import ConfigError, parse_config, require, to_dict
from llmrec.options import BackboneConfig, PromptConfig, Split, ZeroShotMethod, require_seed

logger = logging.getLogger("recipes.zeroshot")

COLUMNS = ["recall@20", "recall_recbole@20", "ndcg@20", "recall@40", "ndcg@100", "users"]


@dataclass
class ZeroShotArgs:
    section: ClassVar[str] = "zeroshot"  # its YAML section (llmrec.config)
    data: str = field(
        default="data/ml-100k",
        metadata={"help": "dataset bundle directory written by `python -m data_prep build`"},
    )
    split: Split = field(default="test", metadata={"help": "split to report"})
    max_users: int | None = field(
        default=None, metadata={"help": "evaluate a seeded random sample of this many users (default: all)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the user sample and the random baseline"})
    output_dir: str = field(default="runs/zeroshot", metadata={"help": "where metrics.json is written"})
    method: ZeroShotMethod = field(
        default="trie", metadata={"help": "scorer (the same scores at different costs)"}
    )
    chunk_size: int = field(default=256, metadata={"help": "trie nodes per forward pass (method=trie)"})
    batch_size: int = field(default=32, metadata={"help": "titles per forward pass (method=cached)"})
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "score only what the exact top-k needs (branch and bound; method=trie): metrics @K <= k "
            "are unchanged, zeroshot-mean is not reported"
        },
    )
    calibrations: list[float] = field(
        default_factory=lambda: [0.0, 0.5, 1.0],
        metadata={
            "help": "weights a of the neutral-prompt log-likelihood subtracted from the sum (0: none, 1: "
            "PMI), chosen on valid together with prior_weights"
        },
    )
    prior_weights: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0],
        metadata={
            "help": "weights w of the log-popularity prior, chosen on valid together with calibrations"
        },
    )
    calibration: float | None = field(
        default=None,
        metadata={"help": "a fixed calibration weight a instead of choosing one (needs prior_weight)"},
    )
    prior_weight: float | None = field(
        default=None,
        metadata={"help": "a fixed log-popularity weight w instead of choosing one (needs calibration)"},
    )

    def __post_init__(self) -> None:
        if (self.calibration is None) != (self.prior_weight is None):
            raise ConfigError("zeroshot: set both calibration and prior_weight, or neither")
        require_seed(self.seed)
        for name in ("max_users", "top_k", "chunk_size", "batch_size"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be at least 1")
        for name in ("calibrations", "prior_weights"):
            require(bool(getattr(self, name)), name, getattr(self, name), "must list at least one weight")


# what this recipe parses; the first is its own YAML section
CONFIGS = (ZeroShotArgs, BackboneConfig, PromptConfig)


def sample_users(heldout_counts: np.ndarray, max_users: int | None, seed: int) -> np.ndarray:
    """Users with held-out items; a seeded sample of ``max_users`` of them, in index order."""
    users = np.flatnonzero(heldout_counts > 0)
    if max_users is not None and max_users < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
    return users


class RandomScorer:
    """Uniform scores seeded per (seed, user), so a user's ranking does not depend on batching."""

    def __init__(self, n_items: int, seed: int) -> None:
        self.n_items, self.seed = n_items, seed

    def score(self, users: np.ndarray) -> np.ndarray:
        return np.stack([np.random.default_rng([self.seed, int(u)]).random(self.n_items) for u in users])


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    setup_logging()
    args, backbone, prompt = parse_config(*CONFIGS, args=argv)
    # the model stack loads after parsing, so --help and argument errors answer at once
    import torch
    from tqdm.auto import tqdm

    from data_prep import load_bundle
    from llmrec.backbone import load_backbone
    from llmrec.baselines import Pop
    from llmrec.metrics import DEFAULT_KS, evaluate_scorer, format_table, history_splits, write_metrics_json
    from llmrec.pipeline import input_histories
    from llmrec.reporting import machine_info
    from llmrec.zeroshot import NORMALIZATIONS, ZeroShotScorer

    bundle = load_bundle(args.data)
    users = sample_users(np.diff(bundle.matrix(args.split).indptr), args.max_users, args.seed)
    ks = tuple(k for k in DEFAULT_KS if args.top_k is None or k <= args.top_k)
    if not ks:
        raise ConfigError(f"--top_k {args.top_k} is below every metric cut-off {DEFAULT_KS}")

    model, tokenizer = load_backbone(backbone)
    scorer = ZeroShotScorer(
        model,
        tokenizer,
        bundle.item_titles,
        prompt,
        args.method,
        args.chunk_size,
        args.batch_size,
        args.top_k,
    )
    logger.info("zero-shot scoring of %d items for %d users (%s)", bundle.n_items, len(users), args.method)
    pop = Pop().fit(bundle.matrix("train"))
    log_pop = torch.log1p(torch.as_tensor(pop.counts, dtype=torch.float64))
    fixed = args.calibration is not None
    inputs = history_splits(bundle, args.split)
    zeroshot = scorer.users(input_histories(bundle, args.split), bundle.seen(args.split))
    start = time.perf_counter()
    if args.top_k is None or fixed:
        neutral = scorer.neutral().total  # once per catalogue; counted in the time

    def prior(calibration: float, weight: float) -> torch.Tensor:
        return weight * log_pop - calibration * neutral

    if args.top_k is not None and fixed:  # the search itself looks for the best calibrated+pop items
        zeroshot = zeroshot.normalized("sum", prior(args.calibration, args.prior_weight))
    tokens = sum(zeroshot.likelihoods(u).tokens_computed for u in tqdm(users, desc="zero-shot", unit="user"))
    seconds = time.perf_counter() - start

    choice = {}
    if fixed:
        calibration, weight = args.calibration, args.prior_weight
        choice = {"calibration": calibration, "prior_weight": weight, "chosen_on": None}
    elif args.top_k is None:
        grid = [(a, w) for a in args.calibrations for w in args.prior_weights]
        selection = zeroshot  # valid is ranked from its own input history, as every scorer's
        if history_splits(bundle, "valid") != inputs:
            selection = scorer.users(input_histories(bundle, "valid"), bundle.seen("valid"))
        valid = {
            (a, w): evaluate_scorer(
                selection.normalized("sum", prior(a, w)),
                bundle,
                "valid",
                users=users,
                ks=(20,),
                progress=False,
            )["ndcg@20"]
            for a, w in grid
        }
        calibration, weight = max(grid, key=valid.get)
        choice = {
            "calibration": calibration,
            "prior_weight": weight,
            "chosen_on": "valid ndcg@20 of the same users",
            "valid_ndcg@20": [
                {"calibration": a, "prior_weight": w, "ndcg@20": v} for (a, w), v in valid.items()
            ],
        }
    if args.top_k is not None:
        scorers = {"zeroshot-calibrated+pop" if fixed else "zeroshot-sum": zeroshot}
    else:
        scorers = {f"zeroshot-{v}": zeroshot.normalized(v) for v in NORMALIZATIONS}
        scorers["zeroshot-calibrated+pop"] = zeroshot.normalized("sum", prior(calibration, weight))
    scorers["pop"] = pop
    scorers["random"] = RandomScorer(bundle.n_items, args.seed)
    rows = {
        name: evaluate_scorer(ranker, bundle, args.split, users=users, ks=ks, progress=False)
        for name, ranker in scorers.items()
    }
    history = "+".join(inputs)
    print(
        f"{args.split} split of {args.data}, {len(users)} users (history: {history}), {backbone.name_or_path}"
    )
    print(format_table(rows, [c for c in COLUMNS if "@" not in c or int(c.split("@")[1]) in ks]))
    timing = {"seconds_per_user": seconds / len(users), "tokens_per_user": tokens / len(users)}
    how = args.method if args.top_k is None else f"{args.method}, exact top-{args.top_k}"
    print(
        f"scoring ({how}): {timing['seconds_per_user']:.2f} s, {timing['tokens_per_user']:.0f} tokens per user"
    )
    if choice:
        print(
            f"zeroshot-calibrated+pop = sum - {choice['calibration']} * neutral + {choice['prior_weight']} * "
            f"log(1 + count) ({choice['chosen_on'] or 'fixed by the config'})"
        )
    path = write_metrics_json(
        Path(args.output_dir) / "metrics.json",
        rows,
        config=to_dict(args, backbone, prompt),
        split=args.split,
        history=history,
        users=[int(u) for u in users],
        timing=timing,
        prior=choice,
        machine=machine_info(),
    )
    logger.info("wrote %s", path)
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
