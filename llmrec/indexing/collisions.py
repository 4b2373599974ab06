"""Making code tuples unique: the collision resolvers every quantizing indexer (RQ-VAE, RQ-KMeans) shares.

Items with the same content (or close enough) get the same code tuple from a residual quantizer. Two
ways to make IDs unique:
``extra_level`` appends a level numbering the items of each collision group (TIGER);
``sinkhorn`` re-assigns the last level of colliding items with Sinkhorn-Knopp balanced
assignment (LC-Rec), finished by an exact assignment to free last-level codes for groups that
Sinkhorn cannot separate (identical embeddings), so the result is always unique.
The indexers that number items (random, sequential, collaborative) are unique by construction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from llmrec.indexing.base import codebook_stats, collision_stats
from llmrec.options import QuantizerConfig


def resolve_collisions(
    raw: np.ndarray, distances: np.ndarray, config: QuantizerConfig
) -> tuple[np.ndarray, list[int], dict[str, Any]]:
    """Resolve ``raw`` codes (n_items, levels) by ``config.resolve``: (codes, codebook sizes, stats).

    ``distances`` (n_items, config.codebook_size): each item's last-level residual to each last-level code
    (Sinkhorn's cost). The stats hold the figures before resolution (``*_before``, ``before_resolution``)
    that the index report shows beside those after.
    """
    before = collision_stats(raw)
    sizes = [config.codebook_size] * raw.shape[1]
    stats: dict[str, Any] = {
        "collision_rate_before": before["collision_rate"],
        "colliding_items_before": before["colliding_items"],
        "before_resolution": {
            **before,
            **codebook_stats(raw, sizes),
            "items_per_leaf": leaf_sizes(raw),
        },
    }
    if config.resolve == "extra_level":
        codes = resolve_extra_level(raw)
        sizes.append(int(codes[:, -1].max()) + 1)
    elif config.resolve == "sinkhorn":
        codes, extra = resolve_sinkhorn(
            raw, distances, config.sinkhorn_epsilon, config.sinkhorn_iters, config.sinkhorn_rounds
        )
        stats.update(extra)
    else:
        codes = raw
    return codes, sizes, stats


def leaf_sizes(codes: np.ndarray) -> dict[str, int]:
    """How many code tuples (leaves) hold 1, 2, ... items, as ``{"items": leaves}`` (JSON keys)."""
    _, counts = np.unique(codes, axis=0, return_counts=True)
    sizes, leaves = np.unique(counts, return_counts=True)
    return {str(int(s)): int(c) for s, c in zip(sizes, leaves, strict=True)}


def resolve_extra_level(codes: np.ndarray) -> np.ndarray:
    """TIGER: append a level numbering the items of each collision group (0 for unique items)."""
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    group_start = np.searchsorted(inverse[order], inverse[order], side="left")
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - group_start
    return np.concatenate([codes, rank[:, None]], axis=1)


def sinkhorn(cost: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp: a transport plan with uniform row and column marginals for ``cost`` (B, K)."""
    q = torch.exp(-cost.double() / epsilon)
    q = q / q.sum()
    b, k = q.shape
    for _ in range(iters):
        q = q / q.sum(0, keepdim=True).clamp_min(1e-300) / k
        q = q / q.sum(1, keepdim=True).clamp_min(1e-300) / b
    return q * b


def _groups(keys: np.ndarray) -> list[np.ndarray]:
    """Rows grouped by identical key rows, groups with more than one row only."""
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    splits = np.split(order, np.cumsum(counts)[:-1])
    return [g for g in splits if len(g) > 1]


def resolve_sinkhorn(
    codes: np.ndarray, distances: np.ndarray, epsilon: float, iters: int, rounds: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """LC-Rec: re-assign the last level of colliding items by Sinkhorn, then finish exactly.

    ``distances`` (n_items, K): distance of each item's last-level residual to each last-level
    codeword. Each round, the items of every collision group get new last codes from a Sinkhorn
    plan over the group (codes held by other items with the same prefix excluded). Groups still
    colliding after ``rounds`` (identical embeddings) get distinct free codes by an exact
    min-cost assignment; a prefix with more items than last-level codes cannot be separated and
    is an error (use ``extra_level`` or larger codebooks).
    """
    codes = codes.copy()
    k = distances.shape[1]
    prefixes, per_prefix = np.unique(codes[:, :-1], axis=0, return_counts=True)
    if per_prefix.max() > k:
        crowded = tuple(int(c) for c in prefixes[per_prefix.argmax()])
        raise ValueError(
            f"{per_prefix.max()} items share the prefix {crowded} but only {k} last-level codes exist; "
            "use resolve='extra_level' or a larger codebook"
        )
    used_rounds = 0
    for _ in range(rounds):
        groups = _groups(codes)
        if not groups:
            break
        used_rounds += 1
        before = codes[:, -1].copy()
        for group in groups:
            cost = _masked_cost(codes, distances, group)
            lo, hi = cost.min(), cost[np.isfinite(cost)].max()
            mid = (lo + hi) / 2
            centred = np.where(np.isfinite(cost), (cost - mid) / (hi - mid + 1e-5), 10.0)
            plan = sinkhorn(torch.from_numpy(centred), epsilon, iters)
            codes[group, -1] = plan.argmax(1).numpy()
        if np.array_equal(before, codes[:, -1]):  # Sinkhorn is deterministic: no change, no progress
            break
    after_sinkhorn = collision_stats(codes)
    for group in _groups(codes):
        move = group[1:]  # the first item keeps the code; the others move to free codes
        cost = _masked_cost(codes, distances, move)
        free = np.flatnonzero(np.isfinite(cost[0]))
        rows, cols = linear_sum_assignment(cost[:, free])
        codes[move[rows], -1] = free[cols]
    return codes, {
        "sinkhorn_rounds": used_rounds,
        "collision_rate_after_sinkhorn": after_sinkhorn["collision_rate"],
    }


def _masked_cost(codes: np.ndarray, distances: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Distances of ``rows`` with last codes taken by other items of the same prefix set to +inf."""
    prefix = codes[rows[0], :-1]
    same = np.flatnonzero((codes[:, :-1] == prefix).all(1))
    others = np.setdiff1d(same, rows)
    cost = distances[rows].astype(np.float64)
    cost[:, codes[others, -1]] = np.inf
    return cost
