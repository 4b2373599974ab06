"""CLLM4Rec recommendation-oriented finetuning: masked history -> multinomial item head.

    accelerate launch recipes/finetune.py --config recipes/configs/ml-100k.yaml --init runs/pretrain [...]

Validates after every epoch on the valid split, keeps the best model (output_dir/best) by
``metric_for_best`` and stops after ``patience`` epochs without improvement.

``--task semantic --index DIR`` (an index from recipes/index.py) trains the generative task instead:
the LM writes a held-out item's semantic ID, and validation ranks by constrained beam search.
``--task sequential`` trains the item head on next-item prediction over the chronological history
(a loss at every item position, one forward per user), ``--task semantic_next`` the semantic-ID
generator on the same next-item setting; both are the tasks of the leave-one-out protocol.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from common.errors import run_cli
from common.log import get_logger, setup_logging
from llmrec.config import ConfigError, parse_config, require
from llmrec.options import BackboneConfig, EvalConfig, FinetuneTask, ModelConfig, TrainConfig

logger = get_logger("finetune")
# model knobs a finetuning run may change
FINETUNE_FIELDS = (
    "head",
    "mutual_reg",
    "max_doc_tokens",
    "history_pool",
    "prior",
    "prior_weight",
    "embedding_dropout",
)


@dataclass
class FinetuneArgs:
    section: ClassVar[str] = "finetune"  # its YAML section (llmrec.config)
    former: ClassVar[dict[str, str]] = {  # keys this section held before EvalConfig
        "eval_batch_size": "eval.batch_size",
        "eval_beam": "eval.beam",
        "metric_for_best": "eval.metric_for_best",
    }
    data: str = field(default="data/ml-100k", metadata={"help": "dataset bundle directory"})
    init: str | None = field(
        default=None,
        metadata={
            "help": "pretraining run to start from: its backbone, LoRA, tables; head, mutual_reg, max_doc_tokens, "
            "history_pool, prior and embedding_dropout from here"
        },
    )
    mask_ratio: float = field(
        default=0.2, metadata={"help": "share of training items held out of the prompt each epoch"}
    )
    target: Literal["all", "masked"] = field(
        default="all", metadata={"help": "multinomial target: all training items, or the masked ones only"}
    )
    prompt_order: Literal["shuffled", "chronological"] = field(
        default="shuffled",
        metadata={"help": "order of the prompt's items while finetuning (chronological: as evaluated)"},
    )
    sequence_windows: bool = field(
        default=False,
        metadata={
            "help": "sequential task: train on every window of a history longer than a prompt holds, not "
            "only its newest items"
        },
    )
    task: FinetuneTask = field(
        default="multinomial",
        metadata={
            "help": "multinomial: item head; semantic: write a held-out item's semantic ID (needs --index); "
            "both; sequential: item head at every position of the chronological history; semantic_next: "
            "write the next item's semantic ID after a chronological prefix (needs --index); "
            "semantic_sequence: the history written in semantic IDs, every next item's ID trained in one "
            "forward (needs --index)"
        },
    )
    text_id_weight: float = field(
        default=0.0,
        metadata={
            "help": "semantic-ID tasks: LC-Rec's text-ID tasks (title -> ID, ID -> title, titles -> next ID) "
            "mixed in, this many rows per main-task row (0: off)"
        },
    )
    item_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "semantic_sequence: also train the item head's next-item softmax, with this weight, at "
            "the positions that write each next item's first code (0: off)"
        },
    )
    with_content: bool = field(
        default=True, metadata={"help": "keep training the content view alongside (CLLM4Rec)"}
    )
    softmax: Literal["full", "chunked", "sampled"] = field(
        default="full", metadata={"help": "item softmax (sampled: logQ-corrected)"}
    )
    softmax_chunk: int = field(default=65536, metadata={"help": "items per chunk for the chunked softmax"})
    softmax_samples: int = field(
        default=8192, metadata={"help": "negatives per batch for the sampled softmax"}
    )

    def __post_init__(self) -> None:
        require(0 <= self.mask_ratio <= 1, "mask_ratio", self.mask_ratio, "must be in [0, 1]")
        require(self.item_loss_weight >= 0, "item_loss_weight", self.item_loss_weight, "must be >= 0")
        if self.item_loss_weight:
            require(
                self.task == "semantic_sequence",
                "item_loss_weight",
                self.item_loss_weight,
                "needs --task semantic_sequence",
            )
        for name in ("softmax_chunk", "softmax_samples"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")


# what this recipe parses; the first is its own YAML section
CONFIGS = (FinetuneArgs, BackboneConfig, ModelConfig, TrainConfig, EvalConfig)


def init_model(init: str) -> Path:
    """The pretrained model that ``--init`` names: ``INIT/model``, written when pretraining ends."""
    from llmrec.run import final_model_dir

    return final_model_dir(init, "--init")


def check_init(init: str, *pairs: tuple) -> None:
    """Refuse backbone/model settings that ``--init`` would override: a value set here (not the default)
    that differs from the pretraining run's, other than the knobs finetuning may change."""
    conflicts = [
        f"{name}={getattr(mine, name)!r} (run: {getattr(theirs, name)!r})"
        for mine, theirs in pairs
        for f in dataclasses.fields(mine)
        if (name := f.name) not in FINETUNE_FIELDS
        and getattr(mine, name) != getattr(theirs, name)
        and getattr(mine, name) != getattr(type(mine)(), name)
    ]
    if conflicts:
        raise ConfigError(
            f"--init {init} brings its own backbone and model, but this config sets {', '.join(conflicts)}; "
            f"remove those settings or make them match (finetuning may change only {', '.join(FINETUNE_FIELDS)})"
        )


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args, backbone, model_config, train_config, eval_config = parse_config(*CONFIGS, args=argv)
    # the model stack loads after parsing, so --help and argument errors answer at once
    from data_prep import load_bundle
    from llmrec.metrics import DEFAULT_KS, LOO_KS, is_leave_one_out
    from llmrec.model import CLLM4Rec
    from llmrec.pipeline import (
        FINETUNE_TASKS,
        GENERATIVE_TASKS,
        blend_prior,
        finetune_dataset,
        fit_prior,
        item_softmax,
        model_for,
        require_same_catalogue,
        validation_fn,
    )
    from llmrec.train import make_accelerator, save_run_config, train

    init = init_model(args.init) if args.init else None  # checked before --overwrite_output_dir deletes
    bundle = load_bundle(args.data)  # checked before --overwrite_output_dir deletes anything
    accelerator = make_accelerator(train_config, inputs={"--init": args.init, "--data": args.data})
    if init is not None:
        model = CLLM4Rec.from_pretrained(init)
        require_same_catalogue(bundle, model, f"--init {args.init}")
        check_init(args.init, (backbone, model.backbone), (model_config, model.config))
        model.reconfigure(**{name: getattr(model_config, name) for name in FINETUNE_FIELDS})
        logger.info(
            "initialised from %s: its backbone, LoRA and tables, with this run's %s",
            args.init,
            FINETUNE_FIELDS,
        )
        backbone, model_config = model.backbone, model.config
    else:
        model = model_for(bundle, model_config, backbone, seed=train_config.seed)
    model.item_softmax = item_softmax(
        bundle, args.softmax, chunk_size=args.softmax_chunk, num_samples=args.softmax_samples
    )
    model.item_loss_weight = args.item_loss_weight
    dataset = finetune_dataset(
        bundle,
        model,
        train_config.seed,
        mask_ratio=args.mask_ratio,
        target=args.target,
        with_content=args.with_content,
        task=args.task,
        prompt_order=args.prompt_order,
        sequence_windows=args.sequence_windows,
        text_id_weight=args.text_id_weight,
        item_targets=args.item_loss_weight > 0,
    )
    if model.head.has_prior:
        logger.info(
            "prior %s fitted on the training matrix: %s", model_config.prior, fit_prior(bundle, model)
        )
    save_run_config(
        accelerator, train_config.output_dir, args, backbone, model_config, train_config, eval_config
    )
    loo = is_leave_one_out(bundle)
    beam = eval_config.beam or max(LOO_KS if loo else DEFAULT_KS)
    evaluate = validation_fn(
        bundle,
        batch_size=eval_config.batch_size,
        beam=beam if args.task in GENERATIVE_TASKS else 0,  # "both" validates the item head
        prompt=FINETUNE_TASKS[args.task],
    )
    metric = eval_config.metric(loo)
    state = train(model, dataset, train_config, accelerator, evaluate=evaluate, metric_for_best=metric)
    if model.head.has_prior and accelerator.is_main_process:
        state["prior_weight"] = blend_prior(
            bundle, Path(train_config.output_dir), metric, eval_config.batch_size, FINETUNE_TASKS[args.task]
        )
    return state


if __name__ == "__main__":
    sys.exit(run_cli(main))
