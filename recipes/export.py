"""Export a finetuned run as a small recommender bundle (safetensors + JSON + peft adapter, no pickle).

    python recipes/export.py --run runs/finetune --out bundles/ml-100k [--merge] [--dtype fp16]

Exports ``RUN/best`` when the run kept a best model, else ``RUN/model`` (the model evaluation uses), with
the id maps, titles, training histories and templates of the run's dataset bundle. ``--merge`` adds
``OUT/merged``: a plain transformers model (LoRA merged, ID tokens as added tokens) plus the item head.
The bundle carries the text-to-ID mapper of ``Recommender.add_items``, fit here on the items' MiniLM
embeddings (``--mapper false``: without it; ``add_items`` then fits it on its first call).
A semantic-ID generator run (``--task semantic|semantic_next|semantic_sequence``) gives a generator
bundle instead: its item index, prompt and beam (``--beam``, default the run's evaluation beam), ranked by
the constrained beam search of ``recipes/evaluate.py --generate true``; new items get codes from the index.
Load the bundle with ``llmrec.Recommender.from_pretrained(OUT)`` or ``python recipes/recommend.py``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

from common.errors import run_cli
from common.log import setup_logging
from llmrec.config import parse_config, require
from llmrec.options import WeightDtype


@dataclass
class ExportArgs:
    section: ClassVar[str] = "export"  # its YAML section (llmrec.config)
    run: str = field(default="runs/finetune", metadata={"help": "finetuning run directory"})
    out: str = field(default="runs/export", metadata={"help": "bundle directory to create"})
    data: str | None = field(
        default=None, metadata={"help": "dataset bundle (default: the one the run trained on)"}
    )
    merge: bool = field(
        default=False,
        metadata={"help": "also write a plain transformers model with LoRA merged (OUT/merged)"},
    )
    dtype: WeightDtype = field(default="fp32", metadata={"help": "dtype of the saved weights"})
    cold_template: str | None = field(
        default=None,
        metadata={
            "help": "prompt for users unseen in training (default: the finetune template without users)"
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing bundle directory"})
    mapper: bool = field(
        default=True,
        metadata={
            "help": "fit the text-to-ID mapper of Recommender.add_items now (MiniLM over every item's text)"
        },
    )
    beam: int = field(
        default=0,
        metadata={
            "help": "a semantic-ID generator run: its bundle's beam width (0: the run's evaluation beam)"
        },
    )

    def __post_init__(self) -> None:
        require(self.beam >= 0, "beam", self.beam, "must be >= 0")


# what this recipe parses; the first is its own YAML section
CONFIGS = (ExportArgs,)


def main(argv: list[str] | None = None) -> str:
    setup_logging()
    (args,) = parse_config(*CONFIGS, args=argv)
    from llmrec.export import export_run  # the model stack loads after parsing: --help answers at once

    out = export_run(
        args.run,
        args.out,
        data=args.data,
        dtype=args.dtype,
        merge=args.merge,
        cold=args.cold_template,
        overwrite=args.overwrite,
        mapper=args.mapper,
        beam=args.beam or None,
    )
    return str(out)


if __name__ == "__main__":
    sys.exit(run_cli(main))
