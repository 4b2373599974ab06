"""Collaborative indexing (CID, "How to Index Item IDs for Recommendation Foundation Models").

Items that are often interacted with by the same users should share ID prefixes. The item
co-occurrence graph (``A = XᵀX`` of the binary user-item training matrix, no self loops) is split
by spectral clustering into ``n_clusters`` groups, each group again, until a group has at most
``max_leaf`` items; the items of a leaf are then numbered. An item's code tuple is its path of
cluster numbers followed by its number in the leaf, so tuples have different lengths (padded
with -1) and are unique by construction.

Spectral clustering uses the regularised normalised adjacency (Qin & Rohe 2013: degree + τ,
τ = mean degree) so that cold items with no co-occurrences do not break the eigenproblem.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from llmrec.indexing.base import PAD, IndexData, Indexer, ItemIndex
from llmrec.indexing.kmeans import kmeans
from llmrec.options import CollaborativeIndexConfig

logger = logging.getLogger(__name__)

DENSE_LIMIT = 2000  # below this many items a dense eigendecomposition is faster and exact


def cooccurrence(interactions, n_items: int) -> sp.csr_matrix:
    """Item-item co-occurrence counts (users in common), zero diagonal."""
    users = interactions["user"].to_numpy()
    items = interactions["item"].to_numpy()
    if len(items) and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"interactions name items outside 0..{n_items - 1}")
    x = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float64), (users, items)), shape=(users.max() + 1, n_items)
    )
    x.data[:] = 1.0  # duplicates count once
    a = (x.T @ x).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    return a


def spectral_embedding(a: sp.csr_matrix, dim: int, seed: int) -> np.ndarray:
    """Top ``dim`` eigenvectors of the regularised normalised adjacency, rows scaled to unit length."""
    n = a.shape[0]
    degree = np.asarray(a.sum(1)).ravel()
    tau = max(float(degree.mean()), 1e-6)
    scale = 1.0 / np.sqrt(degree + tau)
    dim = min(dim, n - 1)
    if n <= DENSE_LIMIT:
        m = scale[:, None] * (a.toarray() + tau / n) * scale[None, :]
        _, vectors = np.linalg.eigh(m)
        vectors = vectors[:, -dim:]
    else:

        def matvec(v: np.ndarray) -> np.ndarray:
            v = v.reshape(n, -1) * scale[:, None]
            return scale[:, None] * (a @ v + tau / n * v.sum(0, keepdims=True))

        op = LinearOperator((n, n), matvec=matvec, matmat=matvec, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(n)
        _, vectors = eigsh(op, k=dim, which="LA", v0=v0)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class CollaborativeIndexer(Indexer):
    """CID: hierarchical spectral clustering of the item co-occurrence graph."""

    method = "collaborative"

    def __init__(self, config: CollaborativeIndexConfig | None = None) -> None:
        self.config = config or CollaborativeIndexConfig()

    def build(self, data: IndexData) -> ItemIndex:
        cfg = self.config
        graph = cooccurrence(data.require("interactions", self.method), data.n_items)
        paths: dict[int, list[int]] = {}
        stack = [(np.arange(data.n_items), [])]
        while stack:
            items, path = stack.pop()
            if len(items) <= cfg.max_leaf:
                for k, item in enumerate(items):
                    paths[int(item)] = [*path, k]
                continue
            labels = self._split(graph[items][:, items], len(path))
            for c in np.unique(labels):
                stack.append((items[labels == c], [*path, int(c)]))
        depth = max(len(p) for p in paths.values())
        codes = np.full((data.n_items, depth), PAD, dtype=np.int64)
        for item, path in paths.items():
            codes[item, : len(path)] = path
        size = max(cfg.n_clusters, cfg.max_leaf)
        logger.info("collaborative index: depth %d, %d items", depth, data.n_items)
        return self.make_index(codes, (size,) * depth, cfg)

    def _split(self, a: sp.csr_matrix, depth: int) -> np.ndarray:
        """Cluster labels 0..n_clusters-1 for one group; falls back to an even split of the
        leading eigenvector's order when k-means puts everything into one cluster."""
        cfg = self.config
        n = a.shape[0]
        k = min(cfg.n_clusters, n)
        emb = spectral_embedding(a, k, cfg.seed + depth)
        _, labels = kmeans(torch.from_numpy(emb).float(), k, seed=cfg.seed + depth)
        labels = labels.numpy()
        if len(np.unique(labels)) < 2:
            order = np.argsort(emb[:, -1], kind="stable")
            labels = np.empty(n, dtype=np.int64)
            labels[order] = np.arange(n) * k // n
        _, labels = np.unique(labels, return_inverse=True)  # contiguous 0..m-1
        return labels.reshape(-1)
