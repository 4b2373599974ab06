"""Index the items of a dataset bundle: every item gets a code tuple (semantic ID or other ID scheme).

    python recipes/index.py --data DIR --method rqvae|rqkmeans|random|sequential|collaborative [--field value ...]

The method's own options are its config dataclass (``RQVAEConfig``, ``RQKMeansConfig``, ``NumberIndexConfig``,
``CollaborativeIndexConfig``), read from the ``indexer:`` section (or ``index: {indexer: ...}``) and
the command line; ``--method M --help`` lists them.

Writes the index (``index.json`` + ``codes.safetensors``) to ``--out`` (default ``DIR/index/METHOD``),
with ``--pieces_vocab_size N`` also a SentencePiece-pieces version beside it (``...-pieces``), and
prints the index report (`llmrec.indexing.report`: codebook usage per level, collisions before/after
resolution, items per leaf and prefix, reconstruction error), also saved as ``report.json`` in the index
directory. Content embeddings for ``rqvae`` and ``rqkmeans`` are cached in ``DIR/embeddings``.

On a cold-items bundle (``data_prep build --split cold-items``) a content indexer is fit on the other
items only, and the split's cold items get their codes as items added later do
(`llmrec.indexing.newitems.build_with_new_items`): a generator evaluated on them ranks items its index
has never been fit to, as a served bundle's new items are.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from common.artifacts import check_target
from common.config import read_yaml
from common.errors import run_cli
from common.log import setup_logging
from llmrec.config import ConfigError, parse_config, require
from llmrec.options import INDEX_CONFIGS, IndexMethod, PiecesConfig

logger = logging.getLogger("recipes.index")
CONTENT_METHODS = ("rqvae", "rqkmeans")  # indexers of the items' text embeddings


@dataclass
class IndexArgs:
    section: ClassVar[str] = "index"  # its YAML section (llmrec.config)
    data: str = field(default="data/ml-100k", metadata={"help": "dataset bundle directory"})
    method: IndexMethod = field(
        default="rqvae", metadata={"help": "its options (section indexer:) are listed by --method M --help"}
    )
    out: str | None = field(default=None, metadata={"help": "index directory (default DATA/index/METHOD)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing item index at --out"})
    # content embeddings (rqvae, rqkmeans; they run on the indexer's --device)
    encoder: str = field(
        default="minilm", metadata={"help": "minilm or backbone:SPEC (mean-pooled LM states)"}
    )
    embeddings_cache: str | None = field(default=None, metadata={"help": "default DATA/embeddings"})
    # sentencepiece pieces (seeded with the indexer's --seed)
    pieces_vocab_size: int = field(
        default=0, metadata={"help": "train SentencePiece pieces of this vocab size (0: off)"}
    )
    pieces_model_type: Literal["bpe", "unigram"] = field(
        default=PiecesConfig.model_type, metadata={"help": "pieces: SentencePiece model type"}
    )

    def __post_init__(self) -> None:
        require(self.pieces_vocab_size >= 0, "pieces_vocab_size", self.pieces_vocab_size, "must be >= 0")


def configs(method: str) -> tuple[type, ...]:
    """What this recipe parses for ``method``: its own section, then that indexer's config (``indexer:``)."""
    if method not in INDEX_CONFIGS:
        raise ConfigError(f"--method must be one of {sorted(INDEX_CONFIGS)}, got {method!r}")
    return IndexArgs, INDEX_CONFIGS[method]


# what this recipe parses with the default method; the first is its own YAML section
CONFIGS = configs(IndexArgs.method)


def chosen_method(argv: list[str] | None) -> str:
    """``--method``, else the config file's ``index: {method}``, else the default: it picks the indexer's
    dataclass, so it is read before the full parse."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.method is None and known.config:
        section = read_yaml(known.config).get(IndexArgs.section)
        known.method = section.get("method") if isinstance(section, dict) else None
    return known.method or IndexArgs.method


def pieces_dir(out: Path) -> Path:
    """Where the SentencePiece index of ``--pieces_vocab_size`` goes: beside the index."""
    return out.with_name(out.name + "-pieces")


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    method = chosen_method(argv)
    args, config = parse_config(*configs(method), args=argv)
    # the model stack loads after parsing, so --help and argument errors answer at once
    from data_prep import load_bundle
    from data_prep.cold import cold_ids
    from llmrec.indexing import INDEXERS, IndexData, train_pieces
    from llmrec.indexing.base import INDEX, describe
    from llmrec.indexing.encoders import item_embeddings
    from llmrec.indexing.newitems import build_with_new_items
    from llmrec.indexing.report import REPORT_FILE, format_report, index_report

    out = Path(args.out or Path(args.data) / "index" / method)
    inputs = {"--data": args.data}
    check_target(out, INDEX, args.overwrite, inputs, nested={"--data"})  # before any work
    if args.pieces_vocab_size:
        check_target(pieces_dir(out), INDEX, args.overwrite, inputs, nested={"--data"})
    bundle = load_bundle(args.data)
    data = IndexData(n_items=bundle.n_items, interactions=bundle.interactions("train"))
    if method in CONTENT_METHODS:
        cache = args.embeddings_cache or str(Path(args.data) / "embeddings")
        data.embeddings = item_embeddings(
            bundle.item_text, args.encoder, cache_dir=cache, device=config.device
        )
    indexer = INDEXERS[method][0](config)
    cold = cold_ids(bundle.manifest, "items") if method in CONTENT_METHODS else []
    if len(cold):
        index = build_with_new_items(indexer, data.embeddings, cold)
        logger.info(
            "fit on %d items; the split's %d cold items coded as new items",
            data.n_items - len(cold),
            len(cold),
        )
    else:
        index = indexer.build(data)
    if method in CONTENT_METHODS:
        index.config["encoder"] = args.encoder
    summary = index_report(index)
    # one of the index's files, so it is written inside the guarded replace with the rest
    index.artifacts[REPORT_FILE] = json.dumps(summary, indent=2).encode("utf-8")
    index.save(out, overwrite=args.overwrite, inputs=inputs)
    print(format_report(summary))
    report = {"index": str(out), "stats": index.stats, "report": summary}
    if args.pieces_vocab_size:
        pieces = train_pieces(
            index, PiecesConfig(args.pieces_vocab_size, args.pieces_model_type, config.seed)
        )
        pieces_out = pieces.save(pieces_dir(out), overwrite=args.overwrite, inputs=inputs)
        print(describe(pieces))
        report["pieces"] = {"index": str(pieces_out), "stats": pieces.stats}
    print(f"written to {out}")
    logger.info("stats: %s", json.dumps(report["stats"], default=str))
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
