"""Alignment after supervised finetuning: DPO, S-DPO or GRPO of the item head, or of the semantic-ID
generator, against the SFT model.

    python recipes/align.py --data DIR --init runs/finetune --output_dir runs/align [--loss sdpo --beta 0.1 ...]

Starts from the SFT run's model (``RUN/best`` or ``RUN/model``), which is also the frozen reference:
for the last ``pairs_per_user`` positions of each user's training history the prompt is the history
before that position and the chosen item the one taken there. ``--loss dpo|sdpo``: the rejected items
are the SFT model's ``n_rejected`` best-ranked items the user never took plus ``n_random`` drawn from the
rest of the unseen catalogue (`llmrec.align`); ``--loss grpo``: every step samples ``grpo_group`` lists of
``grpo_length`` unseen items from the current item head, rewards the chosen item's hit and rank and
keeps the policy near the SFT model by ``kl_weight`` (`llmrec.grpo`). Training runs through the same
loop as the other recipes (``--resume`` continues from the latest checkpoint; the preference rows are
rebuilt from the same SFT model, so they are the same), validating after every epoch and keeping the
best model by ``metric_for_best``. The prompt is the one the SFT run was finetuned on. An item head with
a prior blends it at the SFT run's weight; ``--prior_weight choose`` chooses the weight again on valid for
the aligned model afterwards, as finetuning does (``RUN/prior_weight.json``).

A generator run (``--init`` of task ``semantic``, ``semantic_next`` or ``semantic_sequence``) is aligned
as a generator (`llmrec.generator_align`): ``--loss grpo`` draws ``grpo_group`` rollouts of
``grpo_length`` items per prompt code by code under the item trie (seen items excluded) and rewards the
chosen item's hit and rank, with an exact per-level KL to the SFT model; ``--loss dpo|sdpo`` rejects the
SFT model's constrained-beam top ``n_rejected`` unseen items plus ``n_random`` random ones, over the
items' code-sequence log-probabilities. Validation then ranks by the run's constrained beam search
(``eval.beam``, default the SFT run's), as the generator's finetuning does.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from common.errors import run_cli
from common.log import get_logger, setup_logging
from llmrec.config import ConfigError, parse_config, require
from llmrec.options import EvalConfig, FinetuneTask, TrainConfig

logger = get_logger("align")
AlignLoss = Literal["dpo", "sdpo", "grpo"]  # llmrec.align.PREFERENCE_LOSSES, and llmrec.grpo


@dataclass
class AlignArgs:
    section: ClassVar[str] = "align"  # its YAML section (llmrec.config)
    former: ClassVar[dict[str, str]] = {  # keys this section held before EvalConfig
        "eval_batch_size": "eval.batch_size",
        "metric_for_best": "eval.metric_for_best",
    }
    data: str = field(default="data/ml-100k", metadata={"help": "dataset bundle directory"})
    init: str = field(
        default="runs/finetune", metadata={"help": "the SFT run (recipes/finetune.py): start and reference"}
    )
    task: FinetuneTask | None = field(
        default=None,
        metadata={
            "help": "the SFT run's finetuning task (default: read from --init); a semantic-ID task aligns "
            "the generator (llmrec.generator_align), the others the item head"
        },
    )
    loss: AlignLoss = field(
        default="dpo", metadata={"help": "dpo: pairwise; sdpo: softmax DPO over all rejected; grpo"}
    )
    beta: float = field(default=0.1, metadata={"help": "DPO / S-DPO temperature beta"})
    sft_weight: float = field(
        default=0.0, metadata={"help": "weight of -log pi(chosen) added to the DPO loss (RPO)"}
    )
    pairs_per_user: int = field(
        default=4, metadata={"help": "preference rows per user: the last N positions of the history"}
    )
    n_rejected: int = field(
        default=8,
        metadata={"help": "rejected items per row (the SFT model's top unseen; a generator's: its beam's)"},
    )
    n_random: int = field(
        default=0,
        metadata={"help": "more rejected items per row, drawn uniformly from the other unseen ones"},
    )
    grpo_group: int = field(default=8, metadata={"help": "GRPO: sampled lists per prompt"})
    grpo_length: int = field(
        default=10,
        metadata={"help": "GRPO: items per sampled list (the reward's cutoff; 1: one item, reward = hit)"},
    )
    kl_weight: float = field(default=0.05, metadata={"help": "GRPO: weight of KL(policy || SFT model)"})
    prior_weight: Literal["keep", "choose"] = field(
        default="keep",
        metadata={
            "help": "an item head with a prior: keep the SFT run's blend weight, or choose it again on valid "
            "for the aligned model (as finetuning does; RUN/prior_weight.json)"
        },
    )

    def __post_init__(self) -> None:
        require(self.beta > 0, "beta", self.beta, "must be > 0")
        require(self.sft_weight >= 0, "sft_weight", self.sft_weight, "must be >= 0")
        require(self.pairs_per_user >= 1, "pairs_per_user", self.pairs_per_user, "must be at least 1")
        require(self.n_rejected >= 0, "n_rejected", self.n_rejected, "must be >= 0")
        require(self.n_random >= 0, "n_random", self.n_random, "must be >= 0")
        require(
            self.n_rejected + self.n_random >= 1,
            "n_rejected",
            self.n_rejected,
            "must be >= 1 when n_random is 0",
        )
        require(self.grpo_group >= 2, "grpo_group", self.grpo_group, "must be at least 2")
        require(self.grpo_length >= 1, "grpo_length", self.grpo_length, "must be at least 1")
        require(self.kl_weight >= 0, "kl_weight", self.kl_weight, "must be >= 0")


# what this recipe parses; the first is its own YAML section
CONFIGS = (AlignArgs, TrainConfig, EvalConfig)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args, train_config, eval_config = parse_config(*CONFIGS, args=argv)
    # the model stack loads after parsing, so --help and argument errors answer at once
    from data_prep import load_bundle
    from llmrec.align import DPOLoss, build_preferences
    from llmrec.grpo import GRPOLoss, build_grpo_rows
    from llmrec.metrics import DEFAULT_KS, LOO_KS, is_leave_one_out
    from llmrec.pipeline import (
        FINETUNE_TASKS,
        GENERATIVE_TASKS,
        blend_prior,
        prompts_for,
        validation_fn,
    )
    from llmrec.run import run_model, run_model_dir, run_task
    from llmrec.train import make_accelerator, save_run_config, train

    init = Path(args.init)
    args.task = args.task or run_task(init)
    run_model_dir(init)  # checked before --overwrite_output_dir deletes anything
    bundle = load_bundle(args.data)  # checked before --overwrite_output_dir deletes anything
    model = run_model(init)  # with the prior weight the run chose, kept unless --prior_weight choose
    if args.prior_weight == "choose" and args.task in GENERATIVE_TASKS:
        raise ConfigError(
            f"--prior_weight choose: {init} is a generator run, ranked by its beam, not a prior"
        )
    if args.prior_weight == "choose" and not model.head.has_prior:
        raise ConfigError(f"--prior_weight choose: the item head of {init} has no prior to blend")
    accelerator = make_accelerator(train_config, inputs={"--init": args.init, "--data": args.data})
    prompt = FINETUNE_TASKS[args.task]
    prompts, histories = prompts_for(bundle, model, prompt), bundle.histories("train")
    beam = 0
    if args.task in GENERATIVE_TASKS:
        dataset, beam = generator_alignment(args, model, prompts, histories, init, train_config, eval_config)
        # recorded in the run's config: evaluate and export rank with the beam it was selected by
        eval_config.beam = beam or max(LOO_KS if is_leave_one_out(bundle) else DEFAULT_KS)
        beam = eval_config.beam
    elif args.loss == "grpo":
        dataset = build_grpo_rows(model, prompts, histories, args.pairs_per_user, eval_config.batch_size)
        model.preference = GRPOLoss(args.grpo_group, args.grpo_length, args.kl_weight, seed=train_config.seed)
    else:
        dataset = preference_rows(
            build_preferences, args, model, prompts, histories, train_config, eval_config
        )
        model.preference = DPOLoss(args.beta, args.sft_weight, args.loss)
    logger.info("%d %s rows from %s", len(dataset), args.loss, init)
    save_run_config(accelerator, train_config.output_dir, args, train_config, eval_config)
    evaluate = validation_fn(bundle, batch_size=eval_config.batch_size, beam=beam, prompt=prompt)
    metric = eval_config.metric(is_leave_one_out(bundle))
    if (start := sft_best(init, metric)) is not None:
        logger.info("the SFT start %s logged valid %s %.4f at its best epoch", init, metric, start)
    state = train(model, dataset, train_config, accelerator, evaluate=evaluate, metric_for_best=metric)
    if args.prior_weight == "choose" and accelerator.is_main_process:
        run = Path(train_config.output_dir)
        state["prior_weight"] = blend_prior(bundle, run, metric, eval_config.batch_size, prompt)
    return state


def generator_alignment(args, model, prompts, histories, init, train_config, eval_config):
    """The rows of a generator run's alignment, with ``model.preference`` set to its loss, and the beam
    its validation ranks with (``eval.beam``, else the SFT run's; 0: the largest cut-off)."""
    from llmrec.generator_align import (
        GeneratorDPOLoss,
        GeneratorGRPOLoss,
        build_generator_grpo_rows,
        build_generator_preferences,
        frozen_reference,
    )
    from llmrec.run import run_config

    if args.loss == "grpo":
        dataset = build_generator_grpo_rows(prompts, histories, args.pairs_per_user)
        model.preference = GeneratorGRPOLoss(
            frozen_reference(model), args.grpo_group, args.grpo_length, args.kl_weight, seed=train_config.seed
        )
    else:
        dataset = preference_rows(
            build_generator_preferences, args, model, prompts, histories, train_config, eval_config
        )
        model.preference = GeneratorDPOLoss(args.beta, args.sft_weight, args.loss)
    return dataset, eval_config.beam or int(run_config(init).get("eval", {}).get("beam") or 0)


def preference_rows(build, args, model, prompts, histories, train_config, eval_config):
    """DPO/S-DPO rows by ``build`` (`llmrec.align.build_preferences` for the item head,
    `llmrec.generator_align.build_generator_preferences` for the generator) from the recipe's arguments."""
    return build(
        model,
        prompts,
        histories,
        per_user=args.pairs_per_user,
        n_rejected=args.n_rejected,
        batch_size=eval_config.batch_size,
        n_random=args.n_random,
        seed=train_config.seed,
    )


def sft_best(run: Path, metric: str) -> float | None:
    """The best validation ``metric`` the SFT run logged (its ``metrics.jsonl``): what alignment's
    validation is to beat (its ``best/`` is chosen among the aligned epochs only)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = [row[f"eval/{metric}"] for row in rows if f"eval/{metric}" in row]
    return max(values) if values else None


if __name__ == "__main__":
    sys.exit(run_cli(main))
