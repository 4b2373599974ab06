"""CLLM4Rec recommendation-oriented finetuning: masked history -> multinomial item head.

    accelerate launch recipes/finetune.py --config recipes/configs/ml-100k.yaml --init runs/pretrain [...]

Validates after every epoch on the valid split, keeps the best model (output_dir/best) by
``metric_for_best`` and stops after ``patience`` epochs without improvement.

``--task semantic --index DIR`` (an index from recipes/index.py) trains the generative task instead:
the LM writes a held-out item's semantic ID, and validation ranks by constrained beam search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmrec.config import parse_config
from llmrec.log import get_logger, setup_logging
from llmrec.options import BackboneConfig, ModelConfig, TrainConfig

logger = get_logger("finetune")
FINETUNE_FIELDS = ("head", "mutual_reg", "max_doc_tokens")  # model knobs a finetuning run may change


@dataclass
class FinetuneArgs:
    data: str = field(default="data/ml-100k", metadata={"help": "dataset bundle directory"})
    init: str | None = field(
        default=None,
        metadata={
            "help": "pretraining run to start from: its backbone, LoRA, tables; head/mutual_reg/max_doc_tokens from here"
        },
    )
    mask_ratio: float = field(
        default=0.2, metadata={"help": "share of training items held out of the prompt each epoch"}
    )
    target: str = field(
        default="all", metadata={"help": "multinomial target: all training items | masked ones only"}
    )
    task: str = field(
        default="multinomial",
        metadata={
            "help": "multinomial (item head) | semantic (write a held-out item's semantic ID; needs --index) | both"
        },
    )
    eval_beam: int = field(
        default=100,
        metadata={"help": "semantic task: beam width of validation (at least the largest metric cut-off)"},
    )
    with_content: bool = field(
        default=True, metadata={"help": "keep training the content view alongside (CLLM4Rec)"}
    )
    softmax: str = field(
        default="full", metadata={"help": "item softmax: full | chunked | sampled (logQ-corrected)"}
    )
    softmax_chunk: int = field(default=65536, metadata={"help": "items per chunk for the chunked softmax"})
    softmax_samples: int = field(
        default=8192, metadata={"help": "negatives per batch for the sampled softmax"}
    )
    metric_for_best: str = field(
        default="cllm4rec",
        metadata={"help": "valid metric to select on; cllm4rec = recall@20 + recall@40 + ndcg@100"},
    )
    eval_batch_size: int = field(default=64, metadata={"help": "users per forward pass during validation"})


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args, backbone, model_config, train_config = parse_config(
        FinetuneArgs, BackboneConfig, ModelConfig, TrainConfig, args=argv, section="finetune"
    )
    # the model stack loads after parsing, so --help and argument errors answer at once
    from data_prep import load_bundle
    from llmrec.data import finetune_dataset, item_softmax, model_for, validation_fn
    from llmrec.model import CLLM4Rec
    from llmrec.train import make_accelerator, save_run_config, train

    accelerator = make_accelerator(train_config)
    bundle = load_bundle(args.data)
    if args.init:
        model = CLLM4Rec.from_pretrained(Path(args.init) / "model")
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
    dataset = finetune_dataset(
        bundle,
        model,
        train_config.seed,
        mask_ratio=args.mask_ratio,
        target=args.target,
        with_content=args.with_content,
        task=args.task,
    )
    save_run_config(accelerator, train_config.output_dir, args, backbone, model_config, train_config)
    beam = args.eval_beam if args.task == "semantic" else 0  # "both" validates the item head
    evaluate = validation_fn(bundle, batch_size=args.eval_batch_size, beam=beam)
    return train(
        model, dataset, train_config, accelerator, evaluate=evaluate, metric_for_best=args.metric_for_best
    )


if __name__ == "__main__":
    main()
