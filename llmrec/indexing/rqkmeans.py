"""RQ-KMeans semantic IDs: residual k-means on the item content embeddings (MiniOneRec, OpenOneRec, GRID).

Level 0 clusters the embeddings into ``codebook_size`` groups, level 1 clusters what is left after
subtracting each item's centroid, and so on: an item's code tuple is its cluster at every level and its
reconstruction the sum of those centroids (saved as ``rqkmeans.safetensors``). No encoder is trained, so the index costs seconds and is
deterministic given the seed.

Plain k-means leaves codes empty or crowded where the embeddings are (a few big genres): ``balanced``
replaces Lloyd's nearest-centroid step by a size-constrained assignment in which every code holds
``n // K`` or ``n // K + 1`` items, so every code is used whenever there are at least as many items as
codes (the balanced/constrained RQ-KMeans of OpenOneRec and GRID). The assignment is greedy on sorted
capacities: items that lose most by not getting their nearest code (largest gap between their nearest
and second-nearest centroid) choose first, each taking its nearest code with room left. Written here
because scikit-learn has no size-constrained k-means and ``k-means-constrained`` (a min-cost-flow
solver) is neither a dependency nor fast at 50k items; the greedy step is O(n K log K).
Colliding tuples are made unique as the RQ-VAE's are (`llmrec.indexing.collisions`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from llmrec.indexing.base import IndexData, Indexer, ItemIndex
from llmrec.indexing.collisions import resolve_collisions
from llmrec.indexing.kmeans import kmeans
from llmrec.options import RQKMeansConfig

logger = logging.getLogger(__name__)


def balanced_assignment(distances: np.ndarray) -> np.ndarray:
    """Each row's code under capacities ``n // K`` (+1 for ``n % K`` codes): (n,) codes for (n, K) distances.

    Rows choose in decreasing order of regret (second-nearest minus nearest distance), each its nearest
    code that still has room; ties keep row and code order, so the result is deterministic.
    """
    n, k = distances.shape
    floor, extra = divmod(n, k)
    preference = np.argsort(distances, axis=1, kind="stable")
    nearest = np.take_along_axis(distances, preference[:, :2], axis=1)
    regret = nearest[:, 1] - nearest[:, 0] if k > 1 else np.zeros(n)
    counts = np.zeros(k, dtype=np.int64)
    assign = np.empty(n, dtype=np.int64)
    for row in np.argsort(-regret, kind="stable"):
        for code in preference[row]:
            if counts[code] < floor or (counts[code] == floor and extra > 0):
                extra -= int(counts[code] == floor)
                counts[code] += 1
                assign[row] = code
                break
    return assign


def balanced_kmeans(
    x: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means whose clusters all hold ``n // k`` or ``n // k + 1`` rows: (centroids (k, d), assignment (n,)).

    Starts from plain k-means (k-means++ seeded), then alternates the balanced assignment with centroid
    means until the assignment stops changing.
    """
    centroids, assign = kmeans(x, k, iters=iters, seed=seed)
    for _ in range(iters):
        new = torch.from_numpy(balanced_assignment(torch.cdist(x, centroids).square_().cpu().numpy()))
        new = new.to(x.device)
        sums = torch.zeros_like(centroids).index_add_(0, new, x)
        counts = torch.bincount(new, minlength=k)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign


def residual_kmeans(
    x: torch.Tensor, config: RQKMeansConfig
) -> tuple[np.ndarray, list[torch.Tensor], torch.Tensor, list[float]]:
    """Codes (n, levels), each level's centroids, the last level's input residuals and the
    reconstruction MSE after each level (mean over items and dimensions, as the RQ-VAE's)."""
    residual = x
    codes, books, mse = [], [], []
    for level in range(config.levels):
        cluster = balanced_kmeans if config.balanced else kmeans
        centroids, assign = cluster(
            residual, config.codebook_size, iters=config.iters, seed=config.seed + level
        )
        last_input = residual
        residual = residual - centroids[assign]
        codes.append(assign.cpu().numpy())
        books.append(centroids)
        mse.append(float(residual.square().mean()))
    return np.stack(codes, 1), books, last_input, mse


class RQKMeansIndexer(Indexer):
    """Semantic IDs by residual k-means over item content embeddings (``IndexData.embeddings``)."""

    method = "rqkmeans"

    def __init__(self, config: RQKMeansConfig | None = None) -> None:
        self.config = config or RQKMeansConfig()

    def build(self, data: IndexData) -> ItemIndex:
        cfg = self.config
        x = torch.as_tensor(np.asarray(data.require("embeddings", self.method)), dtype=torch.float32)
        x = x.to(cfg.device)
        raw, books, last_input, mse = residual_kmeans(x, cfg)
        distances = torch.cdist(last_input, books[-1]).cpu().numpy()
        codes, sizes, stats = resolve_collisions(raw, distances, cfg)
        extra: dict[str, Any] = {
            "recon_mse": mse[-1],
            "recon_mse_by_level": mse,
            "embedding_variance": float((x - x.mean(0)).square().mean()),  # the MSE of coding nothing
        }
        logger.info("rq-kmeans: reconstruction MSE by level %s", [f"{m:.6f}" for m in mse])
        index = self.make_index(codes, sizes, cfg, **stats, **extra)
        # the centroids code a new item's embedding the same way (level by level, nearest centroid)
        index.artifacts["rqkmeans.safetensors"] = save_safetensors({"codebooks": torch.stack(books).cpu()})
        return index
