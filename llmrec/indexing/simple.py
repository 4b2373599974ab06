"""Random and sequential indexing ("How to Index Item IDs for Recommendation Foundation Models", Hua et al. 2023).

Both give each item a number and write it as a fixed-length tuple of base-``codebook_size`` digits,
so items whose numbers are close share leading codes (for sequential indexing: items first seen
around the same time).
"""

from __future__ import annotations

import numpy as np

from llmrec.indexing.base import IndexData, Indexer, ItemIndex, digits
from llmrec.options import NumberIndexConfig


class RandomIndexer(Indexer):
    """RID: a seeded random permutation of the items, written in base ``codebook_size``."""

    method = "random"

    def __init__(self, config: NumberIndexConfig | None = None) -> None:
        self.config = config or NumberIndexConfig()

    def build(self, data: IndexData) -> ItemIndex:
        numbers = np.random.default_rng(self.config.seed).permutation(data.n_items)
        return _number_index(self, numbers, self.config)


class SequentialIndexer(Indexer):
    """SID: items numbered by their first appearance in the training interactions (time order).

    Ties in time are broken by user then item index; items never seen in training come last, in
    index order.
    """

    method = "sequential"

    def __init__(self, config: NumberIndexConfig | None = None) -> None:
        self.config = config or NumberIndexConfig()

    def build(self, data: IndexData) -> ItemIndex:
        inter = data.require("interactions", self.method)
        ordered = inter.sort_values(["timestamp", "user", "item"], kind="stable")["item"].to_numpy()
        _, first = np.unique(ordered, return_index=True)
        seen_items = ordered[np.sort(first)]
        unseen = np.setdiff1d(np.arange(data.n_items), seen_items)
        order = np.concatenate([seen_items, unseen])  # order[k] = item numbered k
        if len(order) != data.n_items or order.max(initial=-1) >= data.n_items:
            raise ValueError(f"interactions name items outside 0..{data.n_items - 1}")
        numbers = np.empty(data.n_items, dtype=np.int64)
        numbers[order] = np.arange(data.n_items)
        return _number_index(self, numbers, self.config)


def _number_index(indexer: Indexer, numbers: np.ndarray, config: NumberIndexConfig) -> ItemIndex:
    codes = digits(numbers, config.codebook_size)
    return indexer.make_index(codes, (config.codebook_size,) * codes.shape[1], config)
