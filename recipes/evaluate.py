"""Evaluate a trained run on the full catalogue.

    python recipes/evaluate.py --run runs/finetune --split test [--data DIR]

Uses ``RUN/best`` when the run kept a best model, else ``RUN/model``; prints a table and merges the
split's metrics into ``RUN/metrics.json``. ``--generate`` ranks by constrained beam search of semantic
IDs (runs finetuned with ``--task semantic``) and stores the metrics under ``SPLIT/generate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from common.log import setup_logging
from data_prep import load_bundle
from llmrec.config import parse_config
from llmrec.data import evaluate_model
from llmrec.metrics import DEFAULT_KS, format_table, write_metrics_json
from llmrec.model import CLLM4Rec, run_model_dir


@dataclass
class EvaluateArgs:
    section: ClassVar[str] = "evaluate"  # its YAML section (llmrec.config)
    run: str = field(
        default="runs/finetune", metadata={"help": "run directory (recipes/finetune.py or pretrain.py)"}
    )
    data: str | None = field(
        default=None, metadata={"help": "dataset bundle (default: the one the run trained on)"}
    )
    split: str = field(default="test", metadata={"help": "test | valid"})
    batch_size: int = field(default=64, metadata={"help": "users per forward pass"})
    ks: str = field(default=",".join(map(str, DEFAULT_KS)), metadata={"help": "comma-separated cut-offs"})
    generate: bool = field(
        default=False, metadata={"help": "rank by constrained beam search of semantic IDs, not the item head"}
    )
    beam: int = field(
        default=0, metadata={"help": "beam width with --generate (default: the largest cut-off)"}
    )


# what this recipe parses; the first is its own YAML section
CONFIGS = (EvaluateArgs,)


def main(argv: list[str] | None = None) -> dict[str, float]:
    setup_logging()
    (args,) = parse_config(*CONFIGS, args=argv)
    run = Path(args.run)
    data = args.data or json.loads((run / "run_config.json").read_text())["data"]
    model = CLLM4Rec.from_pretrained(run_model_dir(run))
    ks = tuple(int(k) for k in args.ks.split(","))
    beam = (args.beam or max(ks)) if args.generate else 0
    metrics = evaluate_model(
        load_bundle(data), model, args.split, batch_size=args.batch_size, beam=beam, ks=ks
    )
    key = f"{args.split}/generate" if args.generate else args.split
    columns = [f"{name}@{k}" for name in ("recall", "ndcg") for k in ks]
    print(format_table({f"{run.name} ({key})": metrics}, columns))
    path = run / "metrics.json"
    previous = json.loads(path.read_text())["metrics"] if path.exists() else {}
    write_metrics_json(path, {**previous, key: metrics}, run=str(run), data=str(data))
    return metrics


if __name__ == "__main__":
    main()
