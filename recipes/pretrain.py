"""CLLM4Rec pretraining: collaborative + content language modelling with mutual regularisation.

    accelerate launch recipes/pretrain.py --config recipes/configs/ml-100k.yaml [--field value ...]

The run directory gets checkpoints/ (resumable with --resume), metrics.jsonl, run_config.json and
model/ (trainable weights, ID vocabulary and configs, loadable with CLLM4Rec.from_pretrained).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

from common.errors import run_cli
from common.log import setup_logging
from llmrec.config import parse_config, require
from llmrec.options import PRETRAIN_CORPORA, BackboneConfig, ModelConfig, TrainConfig


@dataclass
class PretrainArgs:
    section: ClassVar[str] = "pretrain"  # its YAML section (llmrec.config)
    data: str = field(
        default="data/ml-100k", metadata={"help": "dataset bundle directory (python -m data_prep build)"}
    )
    corpora: str = field(
        default=",".join(PRETRAIN_CORPORA), metadata={"help": "comma-separated corpora to train on"}
    )

    def __post_init__(self) -> None:
        names = self.corpora.split(",")
        require(
            set(names) <= set(PRETRAIN_CORPORA),
            "corpora",
            self.corpora,
            f"must name some of {PRETRAIN_CORPORA}",
        )


# what this recipe parses; the first is its own YAML section
CONFIGS = (PretrainArgs, BackboneConfig, ModelConfig, TrainConfig)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args, backbone, model_config, train_config = parse_config(*CONFIGS, args=argv)
    # the model stack loads after parsing, so --help and argument errors answer at once
    from data_prep import load_bundle
    from llmrec.pipeline import model_for, pretrain_dataset
    from llmrec.train import make_accelerator, save_run_config, train

    bundle = load_bundle(args.data)  # checked before --overwrite_output_dir deletes anything
    accelerator = make_accelerator(train_config, inputs={"--data": args.data})
    model = model_for(bundle, model_config, backbone, seed=train_config.seed)
    dataset = pretrain_dataset(bundle, model, train_config.seed, corpora=args.corpora.split(","))
    save_run_config(accelerator, train_config.output_dir, args, backbone, model_config, train_config)
    return train(model, dataset, train_config, accelerator)


if __name__ == "__main__":
    sys.exit(run_cli(main))
