"""User ID tables that do not cost a full LM-width row per user.

A full table holds ``n_users x hidden`` floats per view, plus as much again for the gradient and twice for
Adam: at SmolLM2's 576 dimensions 1M users cost ~9 GB per view, so users outgrow one machine before
anything else. The options (``ModelConfig.user_table``):

- ``full``: one trainable row per user (`nn.Embedding`), the CLLM4Rec table.
- ``none``: one shared learned row stands for every user token, so the user is known only by the
  history in the prompt (and the pooled history, ``history_pool="mean"``); memory is constant.
- ``hashed``: ``buckets`` rows; user u's embedding is the sum of ``hashes`` rows chosen by seeded
  universal hashes (the hashing trick with several hash functions, as in Bloom / hash embeddings):
  two users share all of their rows only when every hash collides. Memory is ``buckets x hidden``.
- ``lowrank``: rows of width ``rank`` times one ``(rank, hidden)`` projection, ``n_users x rank`` floats.

``sparse=True`` builds the per-user rows (``full``, ``hashed`` buckets, ``lowrank`` rows) with sparse
gradients, so a step touches only the rows of its batch (`llmrec.optim.RowSparseAdamW` steps them).
Only user tables are offered these options: the item table is also the tied item head, whose gradient
is dense over the whole catalogue anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

HASH_PRIME = 2**31 - 1  # a Mersenne prime above any user index; (a * u + b) stays below 2**62 in int64
HASH_SEED = 20260  # the hash functions are fixed by it (and their number), so a saved model re-derives them


def hash_coefficients(hashes: int, seed: int = HASH_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` of ``hashes`` universal hash functions ``((a * u + b) mod p) mod buckets``.

    Drawn by numpy's PCG64 from a fixed seed: the same on every platform and numpy version, so a saved
    hashed table means the same users after a reload.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(1, HASH_PRIME, size=hashes, dtype=np.int64)
    b = rng.integers(0, HASH_PRIME, size=hashes, dtype=np.int64)
    return a, b


@dataclass(frozen=True)
class UserTableSpec:
    """How a view's user table is built (see the module docstring for the kinds)."""

    kind: str = "full"
    buckets: int = 65536
    hashes: int = 2
    rank: int = 32
    sparse: bool = False

    def build(self, n_rows: int, hidden: int, device=None, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The table module: ``forward(rows) -> (..., hidden)`` for user indices ``rows``."""
        if self.kind == "full":
            return nn.Embedding(n_rows, hidden, device=device, dtype=dtype, sparse=self.sparse)
        if self.kind == "none":
            return SharedRow(hidden, device=device, dtype=dtype)
        if self.kind == "hashed":
            return HashedTable(n_rows, self.buckets, self.hashes, hidden, self.sparse, device, dtype)
        if self.kind == "lowrank":
            return LowRankTable(n_rows, self.rank, hidden, self.sparse, device, dtype)
        raise ValueError(f"unknown user table {self.kind!r}: expected full, none, hashed or lowrank")


FULL_TABLE = UserTableSpec()  # the default: one trainable row per user


class SharedRow(nn.Module):
    """One learned row returned for every index: the ``none`` option (no per-user parameter)."""

    def __init__(self, hidden: int, device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden, device=device, dtype=dtype))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight[0].expand(*rows.shape, -1)

    @torch.no_grad()
    def reset(self, generator: torch.Generator, std: float) -> None:
        self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * std)


class HashedTable(nn.Module):
    """``n_rows`` users over ``buckets`` shared rows: a user's embedding sums its ``hashes`` bucket rows."""

    def __init__(
        self,
        n_rows: int,
        buckets: int,
        hashes: int,
        hidden: int,
        sparse: bool = False,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if buckets < 1 or hashes < 1:
            raise ValueError(f"a hashed table needs buckets >= 1 and hashes >= 1, got {buckets}, {hashes}")
        if n_rows >= HASH_PRIME:
            raise ValueError(f"hashed tables take fewer than {HASH_PRIME} users, got {n_rows}")
        self.n_rows, self.buckets = n_rows, buckets
        self.embedding = nn.Embedding(buckets, hidden, device=device, dtype=dtype, sparse=sparse)
        a, b = hash_coefficients(hashes)
        # derived from the fixed seed, never saved: non-persistent buffers so they follow .to(device)
        self.register_buffer("hash_a", torch.as_tensor(a, device=device), persistent=False)
        self.register_buffer("hash_b", torch.as_tensor(b, device=device), persistent=False)

    def bucket_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., hashes) bucket of each user index under each hash function."""
        mixed = (rows.long().unsqueeze(-1) * self.hash_a + self.hash_b) % HASH_PRIME
        return mixed % self.buckets

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.bucket_ids(rows)).sum(-2)

    @torch.no_grad()
    def reset(self, generator: torch.Generator, std: float) -> None:
        # a sum of `hashes` independent rows: each at std / sqrt(hashes) so the sum has the asked std
        scale = std / len(self.hash_a) ** 0.5
        self.embedding.weight.copy_(torch.randn(self.embedding.weight.shape, generator=generator) * scale)


class LowRankTable(nn.Module):
    """``n_rows`` rows of width ``rank`` times a shared ``(rank, hidden)`` projection."""

    def __init__(
        self,
        n_rows: int,
        rank: int,
        hidden: int,
        sparse: bool = False,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"a low-rank table needs rank >= 1, got {rank}")
        self.n_rows = n_rows
        self.embedding = nn.Embedding(n_rows, rank, device=device, dtype=dtype, sparse=sparse)
        self.projection = nn.Parameter(torch.empty(rank, hidden, device=device, dtype=dtype))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.embedding(rows) @ self.projection

    @torch.no_grad()
    def reset(self, generator: torch.Generator, std: float) -> None:
        # unit rows and a projection at std / sqrt(rank): each output coordinate then has the asked std
        self.embedding.weight.copy_(torch.randn(self.embedding.weight.shape, generator=generator))
        rank = self.projection.shape[0]
        self.projection.copy_(torch.randn(self.projection.shape, generator=generator) * std / rank**0.5)


@torch.no_grad()
def reset_table(table: nn.Module, generator: torch.Generator, std: float) -> None:
    """Draw a table's weights ~ N(0, std^2) per output coordinate, on CPU (the same on every device)."""
    if isinstance(table, nn.Embedding):
        table.weight.copy_(torch.randn(table.weight.shape, generator=generator) * std)
    else:
        table.reset(generator, std)


@torch.no_grad()
def materialize(table: nn.Module, n_rows: int) -> torch.Tensor:
    """Every row of a table, (n_rows, hidden): what a plain HF model's embedding matrix needs."""
    if isinstance(table, nn.Embedding):
        return table.weight.detach()
    return table(torch.arange(n_rows, device=next(table.parameters()).device)).detach()
