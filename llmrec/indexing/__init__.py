"""Item indexers: every method gives each item a code tuple, saved in one format (:class:`ItemIndex`).

``rqvae`` and ``rqkmeans`` (semantic IDs from content), ``random``, ``sequential`` and ``collaborative`` (Hua et
al. 2023) share the :class:`Indexer` interface; :func:`train_pieces` turns any index into
SentencePiece pieces; :meth:`ItemIndex.trie` gives the prefix trie for constrained decoding.
"""

from __future__ import annotations

from typing import Any

from llmrec.indexing.base import IndexData, Indexer, ItemIndex, collision_stats, index_stats
from llmrec.indexing.collaborative import CollaborativeIndexConfig, CollaborativeIndexer
from llmrec.indexing.pieces import PiecesConfig, train_pieces
from llmrec.indexing.rqkmeans import RQKMeansConfig, RQKMeansIndexer
from llmrec.indexing.rqvae import RQVAEConfig, RQVAEIndexer
from llmrec.indexing.simple import NumberIndexConfig, RandomIndexer, SequentialIndexer
from llmrec.options import INDEX_CONFIGS

_INDEXER_CLASSES: dict[str, type[Indexer]] = {
    "rqvae": RQVAEIndexer,
    "rqkmeans": RQKMeansIndexer,
    "random": RandomIndexer,
    "sequential": SequentialIndexer,
    "collaborative": CollaborativeIndexer,
}
# each method's indexer and config dataclass (the configs live in llmrec.options, importable without torch)
INDEXERS: dict[str, tuple[type[Indexer], type]] = {
    method: (indexer, INDEX_CONFIGS[method]) for method, indexer in _INDEXER_CLASSES.items()
}


def make_indexer(method: str, **config: Any) -> Indexer:
    """An indexer by name, configured by keyword arguments of its config dataclass."""
    if method not in INDEXERS:
        raise ValueError(f"unknown indexing method {method!r}; expected one of {sorted(INDEXERS)}")
    indexer_cls, config_cls = INDEXERS[method]
    return indexer_cls(config_cls(**config))


__all__ = [
    "INDEXERS",
    "CollaborativeIndexConfig",
    "CollaborativeIndexer",
    "IndexData",
    "Indexer",
    "ItemIndex",
    "NumberIndexConfig",
    "PiecesConfig",
    "RQKMeansConfig",
    "RQKMeansIndexer",
    "RQVAEConfig",
    "RQVAEIndexer",
    "RandomIndexer",
    "SequentialIndexer",
    "collision_stats",
    "index_stats",
    "make_indexer",
    "train_pieces",
]
