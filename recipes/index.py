"""Index the items of a dataset bundle: every item gets a code tuple (semantic ID or other ID scheme).

    python recipes/index.py --data DIR --method rqvae|random|sequential|collaborative [--field value ...]

Writes the index (``index.json`` + ``codes.safetensors``) to ``--out`` (default ``DIR/index/METHOD``),
with ``--pieces_vocab_size N`` also a SentencePiece-pieces version beside it (``...-pieces``), and
prints the quality figures. Content embeddings for ``rqvae`` are cached in ``DIR/embeddings``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from common.errors import run_cli
from common.log import setup_logging
from data_prep import load_bundle
from llmrec.config import ConfigError, parse_config
from llmrec.indexing import INDEXERS, IndexData, PiecesConfig, make_indexer, train_pieces
from llmrec.indexing.base import describe
from llmrec.indexing.encoders import item_embeddings

logger = logging.getLogger("recipes.index")


@dataclass
class IndexArgs:
    section: ClassVar[str] = "index"  # its YAML section (llmrec.config)
    data: str = field(default="data/ml-100k", metadata={"help": "dataset bundle directory"})
    method: str = field(default="rqvae", metadata={"help": f"one of {sorted(INDEXERS)}"})
    out: str | None = field(default=None, metadata={"help": "index directory (default DATA/index/METHOD)"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    # content embeddings (rqvae)
    encoder: str = field(
        default="minilm", metadata={"help": "minilm or backbone:SPEC (mean-pooled LM states)"}
    )
    embeddings_cache: str | None = field(default=None, metadata={"help": "default DATA/embeddings"})
    device: str = field(default="cpu", metadata={"help": "device for the encoder and the RQ-VAE"})
    # rqvae / random / sequential
    codebook_size: int = field(default=256, metadata={"help": "codes per level"})
    levels: int = field(default=3, metadata={"help": "rqvae: quantization levels"})
    latent_dim: int = field(default=32, metadata={"help": "rqvae: latent size"})
    hidden_dims: list[int] = field(
        default_factory=lambda: [512, 256, 128], metadata={"help": "rqvae: MLP widths"}
    )
    beta: float = field(default=0.25, metadata={"help": "rqvae: commitment loss weight"})
    epochs: int = field(default=300, metadata={"help": "rqvae: training epochs"})
    batch_size: int = field(default=256, metadata={"help": "rqvae: batch size"})
    lr: float = field(default=1e-3, metadata={"help": "rqvae: AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "rqvae: AdamW weight decay"})
    dead_code_every: int = field(
        default=10, metadata={"help": "rqvae: epochs between dead-code re-inits (0: off)"}
    )
    cosine_lr: bool = field(default=True, metadata={"help": "rqvae: cosine learning-rate decay to 0"})
    resolve: str = field(
        default="sinkhorn", metadata={"help": "rqvae collisions: sinkhorn, extra_level or none"}
    )
    # collaborative
    n_clusters: int = field(default=16, metadata={"help": "collaborative: clusters per split"})
    max_leaf: int = field(default=16, metadata={"help": "collaborative: largest cluster left unsplit"})
    # sentencepiece pieces
    pieces_vocab_size: int = field(
        default=0, metadata={"help": "train SentencePiece pieces of this vocab size (0: off)"}
    )
    pieces_model_type: str = field(default="bpe", metadata={"help": "pieces: bpe or unigram"})


# what this recipe parses; the first is its own YAML section
CONFIGS = (IndexArgs,)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_config(*CONFIGS, args=argv)
    bundle = load_bundle(args.data)
    data = IndexData(n_items=bundle.n_items, interactions=bundle.interactions("train"))
    if args.method == "rqvae":
        cache = args.embeddings_cache or str(Path(args.data) / "embeddings")
        data.embeddings = item_embeddings(bundle.item_text, args.encoder, cache_dir=cache, device=args.device)
    _, config_cls = INDEXERS.get(args.method, (None, None))
    if config_cls is None:
        raise ConfigError(f"--method must be one of {sorted(INDEXERS)}, got {args.method!r}")
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
    index = make_indexer(args.method, **options).build(data)
    if args.method == "rqvae":
        index.config["encoder"] = args.encoder
    out = Path(args.out or Path(args.data) / "index" / args.method)
    index.save(out)
    print(describe(index))
    report = {"index": str(out), "stats": index.stats}
    if args.pieces_vocab_size:
        pieces = train_pieces(index, PiecesConfig(args.pieces_vocab_size, args.pieces_model_type, args.seed))
        pieces_out = pieces.save(out.with_name(out.name + "-pieces"))
        print(describe(pieces))
        report["pieces"] = {"index": str(pieces_out), "stats": pieces.stats}
    print(f"written to {out}")
    logger.info("stats: %s", json.dumps(report["stats"], default=str))
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
