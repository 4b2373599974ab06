"""Evaluate a trained run on the full catalogue.

    python recipes/evaluate.py --run runs/finetune --split test [--data DIR]

Uses ``RUN/best`` when the run kept a best model, else ``RUN/model``; prints a table and merges the
split's metrics into ``RUN/metrics.json``. ``--generate`` ranks by constrained beam search of semantic
IDs (runs finetuned with ``--task semantic`` or ``semantic_next``) and stores the metrics under
``SPLIT/generate``. The prompt is the one the run was finetuned on (its ``task`` in ``run_config.json``).
On a leave-one-out bundle the metrics are HR/NDCG@5/10/20 and the test prompt also holds the validation
item; ``--exclude_seen false`` keeps seen items in the ranking (stored under ``SPLIT/seen_kept``).

On a cold-items bundle (``data_prep build --split cold-items``) the unseen items first get rows from
their text (``--cold_method``, see ``llmrec.coldstart``), then two views are reported: ``SPLIT/all``
ranks the whole catalogue, ``SPLIT/cold`` ranks the split's cold items only. With ``--generate`` the
cold items are ranked by their semantic IDs (coded as new items by ``recipes/index.py``): the beam
searches the whole trie (``SPLIT/generate/all``), then the cold items' part of it
(``SPLIT/generate/cold``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from common.errors import run_cli
from common.log import setup_logging
from llmrec.config import ConfigError, parse_config, require
from llmrec.options import EvalConfig, Split


@dataclass
class EvaluateArgs:
    section: ClassVar[str] = "evaluate"  # its YAML section (llmrec.config)
    former: ClassVar[dict[str, str]] = {
        "batch_size": "eval.batch_size",
        "beam": "eval.beam",
    }  # before EvalConfig
    run: str = field(
        default="runs/finetune", metadata={"help": "run directory (recipes/finetune.py or pretrain.py)"}
    )
    data: str | None = field(
        default=None, metadata={"help": "dataset bundle (default: the one the run trained on)"}
    )
    split: Split = field(default="test", metadata={"help": "split to rank"})
    ks: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated cut-offs (default: 5,10,20 on a leave-one-out bundle, else 10,20,40,100)"
        },
    )
    exclude_seen: bool = field(
        default=True,
        metadata={"help": "exclude the user's training (and, for test, validation) items from the ranking"},
    )
    generate: bool = field(
        default=False, metadata={"help": "rank by constrained beam search of semantic IDs, not the item head"}
    )
    diagnostic_users: int = field(
        default=256,
        metadata={
            "help": "with --generate: users whose lists get validity diagnostics (with and without the trie)"
        },
    )
    cold_method: Literal["mapper", "fold-in", "mapper+fold-in"] = field(
        default="mapper", metadata={"help": "cold-items bundles: how unseen items get rows"}
    )
    encoder: str = field(default="minilm", metadata={"help": "text encoder of the cold-item mapper"})
    prior_weight: float | None = field(
        default=None,
        metadata={
            "help": "blend the run's prior at this weight instead of the one finetuning chose on valid "
            "(0: the LM alone); stored under SPLIT/prior_weight=W"
        },
    )

    def __post_init__(self) -> None:
        require(self.diagnostic_users >= 0, "diagnostic_users", self.diagnostic_users, "must be >= 0")
        cut_offs = (self.ks or "1").split(",")
        valid = all(k.strip().isdigit() and int(k) >= 1 for k in cut_offs)
        require(valid, "ks", self.ks, "must be comma-separated positive integers")


# what this recipe parses; the first is its own YAML section
CONFIGS = (EvaluateArgs, EvalConfig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    args, eval_config = parse_config(*CONFIGS, args=argv)
    # the model stack loads after parsing, so --help and argument errors answer at once
    from data_prep import load_bundle
    from data_prep.cold import cold_ids
    from llmrec.coldstart import cold_start
    from llmrec.metrics import (
        DEFAULT_KS,
        LOO_KS,
        evaluate_cold_items,
        format_table,
        is_leave_one_out,
        with_selection_metric,
    )
    from llmrec.pipeline import (
        FINETUNE_TASKS,
        cold_view_scorers,
        evaluate_model,
        require_same_catalogue,
        scorer_for,
    )
    from llmrec.run import record_evaluation, run_data, run_model, run_task

    run = Path(args.run)
    data = args.data or run_data(run)
    model = run_model(run)
    bundle = load_bundle(data)
    require_same_catalogue(bundle, model, f"the model of {run}")
    if args.prior_weight is not None:
        if not model.head.has_prior:
            raise ConfigError(f"--prior_weight: the model of {run} has no prior (prior: none)")
        model.head.set_prior_weight(args.prior_weight)
    loo = is_leave_one_out(bundle)
    ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else (LOO_KS if loo else DEFAULT_KS)
    prompt = FINETUNE_TASKS[run_task(run)]
    cold = cold_ids(bundle.manifest, "items", args.split)
    beam = (eval_config.beam or max(ks)) if args.generate else 0
    if beam and beam < max(ks):
        raise ConfigError(
            f"--beam {beam} is shorter than the largest cut-off @{max(ks)}: give --ks up to {beam}"
        )
    if len(cold):
        if args.generate:  # the cold items' semantic IDs are in the index (recipes/index.py)
            scorer, cold_scorer = cold_view_scorers(
                bundle, model, args.split, cold, beam, eval_config.batch_size, prompt
            )
            how, key = "their semantic IDs", f"{args.split}/generate"
        else:
            cold_start(
                model,
                bundle,
                args.cold_method,
                items=cold_ids(bundle.manifest, "items"),
                encoder=args.encoder,
            )
            scorer = scorer_for(bundle, model, eval_config.batch_size, split=args.split, prompt=prompt)
            cold_scorer, how, key = None, args.cold_method, args.split
        views = evaluate_cold_items(scorer, bundle, args.split, cold, ks=ks, cold_scorer=cold_scorer)
        results = {f"{key}/{name}": with_selection_metric(m) for name, m in views.items()}
        print(f"cold items: {how}; 'cold' ranks the {len(cold)} cold {args.split} items only")
        columns = [f"{name}@{k}" for name in ("recall", "ndcg") for k in ks]
        print(format_table({f"{run.name} ({key})": m for key, m in results.items()}, columns))
        record_evaluation(run, results, run=str(run), data=str(data))
        return results
    metrics = evaluate_model(
        bundle,
        model,
        args.split,
        batch_size=eval_config.batch_size,
        beam=beam,
        prompt=prompt,
        exclude_seen=args.exclude_seen,
        diagnostic_users=args.diagnostic_users,
        ks=ks,
    )
    key = f"{args.split}/generate" if args.generate else args.split
    key += "" if args.exclude_seen else "/seen_kept"
    key += "" if args.prior_weight is None else f"/prior_weight={args.prior_weight:g}"
    columns = [f"{name}@{k}" for name in (("hr", "ndcg") if loo else ("recall", "ndcg")) for k in ks]
    print(format_table({f"{run.name} ({key})": metrics}, columns))
    validity = {name.split("/", 1)[1]: v for name, v in metrics.items() if name.startswith("validity/")}
    if validity:
        print(format_table({"validity": validity}, list(validity)))
    record_evaluation(run, {key: metrics}, run=str(run), data=str(data))
    return metrics


if __name__ == "__main__":
    sys.exit(run_cli(main))
