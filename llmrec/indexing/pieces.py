"""SentencePiece semantic-ID pieces ("Better Generalization with Semantic IDs", Singh et al. 2024).

Fixed-length semantic IDs spend one token per level even when some code n-grams are very common.
Here every (position, code) pair becomes one symbol, each item's code tuple a "sentence" of
symbols, and a SentencePiece model learns sub-pieces over these sentences: frequent code n-grams
become single tokens, rare ones stay split, and the token count per item adapts to the data.
The result is an :class:`ItemIndex` with one shared codebook (the piece vocabulary) and tuples of
piece ids of varying length. The trained model is kept as an artifact (``spm.model``, a
SentencePiece protobuf) so new code tuples can be segmented the same way.
"""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
import sentencepiece as spm

from llmrec.indexing.base import PAD, ItemIndex, index_stats
from llmrec.options import PiecesConfig

logger = logging.getLogger(__name__)

SYMBOL_BASE = 0x4E00  # CJK ideographs: one character per (position, code), no normaliser surprises
SYMBOL_LIMIT = 0x9FFF - SYMBOL_BASE + 1


def code_symbols(index: ItemIndex) -> list[str]:
    """Each item's code tuple as a string of one character per (position, code)."""
    if index.shared_codebook:
        raise ValueError("the index already has a shared (piece) codebook")
    offsets = np.concatenate([[0], np.cumsum(index.codebook_sizes)[:-1]])
    if sum(index.codebook_sizes) > SYMBOL_LIMIT:
        raise ValueError(
            f"{sum(index.codebook_sizes)} (position, code) symbols exceed the limit {SYMBOL_LIMIT}"
        )
    return [
        "".join(chr(SYMBOL_BASE + int(o) + int(c)) for o, c in zip(offsets, row, strict=True) if c >= 0)
        for row in index.codes
    ]


def train_pieces(index: ItemIndex, config: PiecesConfig | None = None) -> ItemIndex:
    """Re-express a unique index as SentencePiece piece-id tuples (see the module docstring)."""
    config = config or PiecesConfig()
    sentences = code_symbols(index)
    n_symbols = len(set("".join(sentences)))
    if config.vocab_size <= n_symbols:
        raise ValueError(
            f"pieces vocab_size {config.vocab_size} must exceed the {n_symbols} distinct (position, code) "
            "symbols (every symbol is a piece, plus <unk>)"
        )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=config.vocab_size,
        model_type=config.model_type,
        character_coverage=1.0,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_by_unicode_script=False,
        split_by_number=False,
        max_sentencepiece_length=index.max_len,
        hard_vocab_limit=False,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        num_threads=1,
        minloglevel=2,
    )
    blob = model.getvalue()
    processor = spm.SentencePieceProcessor(model_proto=blob)
    pieces = processor.encode(sentences)
    width = max(len(p) for p in pieces)
    codes = np.full((index.n_items, width), PAD, dtype=np.int64)
    for item, ids in enumerate(pieces):
        codes[item, : len(ids)] = ids
    if (
        codes == processor.unk_id()
    ).any():  # cannot happen with character_coverage=1.0; IDs must stay lossless
        raise RuntimeError("SentencePiece mapped a code symbol to <unk>; the pieces would not be unique")
    vocab_size = processor.get_piece_size()
    stats = index_stats(codes, (vocab_size,), shared=True)
    stats.update(
        vocab_size=vocab_size,
        fixed_tokens_per_item=float(index.lengths().mean()),
    )
    logger.info(
        "sentencepiece pieces: vocab %d, %.2f tokens/item (fixed form: %.2f)",
        vocab_size,
        stats["mean_tokens_per_item"],
        stats["fixed_tokens_per_item"],
    )
    return ItemIndex(
        codes=codes,
        codebook_sizes=(vocab_size,),
        method=f"{index.method}+pieces",
        stats=stats,
        config={"source": index.config, "source_method": index.method, **dataclasses.asdict(config)},
        shared_codebook=True,
        artifacts={"spm.model": blob},
    )
