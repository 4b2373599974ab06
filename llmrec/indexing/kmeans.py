"""Seeded k-means (k-means++ seeding + Lloyd) in torch.

Written here because scikit-learn is not a dependency and the RQ-VAE needs it on whatever device
the model trains on; collaborative indexing reuses it for spectral clustering.
"""

from __future__ import annotations

import torch


def kmeans(
    x: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0, tol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``x`` (n, d) into ``k`` groups; returns (centroids (k, d), assignment (n,)).

    With fewer distinct points than ``k`` the surplus centroids are copies of data points (they
    stay empty); empty clusters during Lloyd steps are re-seeded at the points farthest from
    their centroid, so every cluster is used whenever the data allow.
    """
    x = x.detach().float()
    n = len(x)
    if n == 0 or k <= 0:
        raise ValueError(f"kmeans needs points and k > 0 (n={n}, k={k})")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centroids = _plus_plus(x, k, gen)
    assign = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        dist = torch.cdist(x, centroids).square_()
        min_dist, assign = dist.min(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        empty = (counts == 0).nonzero().flatten()
        if len(empty) and n > k:
            far = torch.argsort(min_dist, descending=True)[: len(empty)]
            new[empty[: len(far)]] = x[far]
        shift = (new - centroids).square().sum()
        centroids = new
        if shift <= tol * (centroids.square().sum() + 1e-12) and not len(empty):
            break
    assign = torch.cdist(x, centroids).argmin(1)
    return centroids, assign


def _plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centroid drawn with probability proportional to squared distance."""
    n = len(x)
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    min_dist = (x - x[first]).square().sum(1)
    for _ in range(1, k):
        total = float(min_dist.sum())
        if total <= 0:  # every point is already a centroid: repeat points
            nxt = int(torch.randint(n, (1,), generator=gen))
        else:
            nxt = int(torch.multinomial((min_dist / total).cpu(), 1, generator=gen))
        chosen.append(nxt)
        min_dist = torch.minimum(min_dist, (x - x[nxt]).square().sum(1))
    return x[torch.tensor(chosen, device=x.device)].clone()
