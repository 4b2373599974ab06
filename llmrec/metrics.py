"""Full-catalogue ranking metrics: Recall@K, NDCG@K, MRR@K, hit rate and item coverage.

Every score in the project (LLM recommender, zero-shot, baselines) goes through this module, so that
tables are comparable. Conventions:

- Ranking is over the whole catalogue. Excluded items (the training items, plus the validation items
  when scoring the test split) get ``-inf`` before ranking.
- Ties are broken by the lower item index: the top-K list is exactly what a stable descending sort of
  the scores over item indices 0..n-1 would give. ``torch.topk`` alone does not promise this, so the
  boundary ties are resolved explicitly (see :meth:`RankingMetrics.topk`).
- ``recall@K`` = hits / min(K, |held-out|) (Mult-VAE, CLLM4Rec); ``recall_recbole@K`` = hits / |held-out|
  (RecBole); ``ndcg@K`` uses binary relevance with the ideal DCG over min(K, |held-out|) positions;
  ``mrr@K`` is 1 / rank of the first hit (0 without a hit); ``hit@K`` is 1 when any held-out item is in
  the top K; ``coverage@K`` is the fraction of the catalogue that appears in at least one user's top K.
- Users without held-out items are skipped and counted in ``users_skipped``; ``users`` counts the users
  the averages are over.
- Next-item leave-one-out bundles (every user holds at most one valid and one test interaction, as in
  SASRec, TIGER and the generative-recommendation literature) are detected by :func:`is_leave_one_out`
  and reported at @5/@10/@20 with ``hr@K`` (hit ratio: ``hit@K``, which with one held-out item is also
  recall) next to ``ndcg@K`` (with IDCG 1). The input history for the test split then includes the
  validation item (:func:`history_splits`), since it precedes the test item in time.
- Seen items are excluded by default; ``exclude_seen=False`` keeps them in the ranking (the
  generative-recommendation literature is split on this, so both are one flag apart).

The metrics are written here rather than taken from RecBole or torchmetrics: RecBole brings its whole
training framework with it, and torchmetrics' retrieval metrics work on per-query candidate lists rather
than a full catalogue with exclusions, and have no min(K, |held-out|) recall.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from common.io import write_json

logger = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (10, 20, 40, 100)
LOO_KS: tuple[int, ...] = (5, 10, 20)
METRIC_NAMES: tuple[str, ...] = ("recall", "recall_recbole", "ndcg", "mrr", "hit", "coverage")


class Scorer(Protocol):
    """The one scoring interface of the project (item head, generation, zero-shot, baselines).

    ``score(users)`` takes user indices and returns (len(users), n_items) scores, higher is better;
    evaluation masks the excluded items itself.
    """

    def score(self, users: np.ndarray) -> np.ndarray | torch.Tensor: ...


def _dense_rows(
    rows: sp.spmatrix | np.ndarray | torch.Tensor, shape: tuple[int, int], what: str
) -> torch.Tensor:
    """A (batch, n_items) boolean tensor from csr rows (or an already dense array/tensor)."""
    if sp.issparse(rows):
        dense = torch.from_numpy(rows.toarray() != 0)
    else:
        dense = torch.as_tensor(rows) != 0
    if tuple(dense.shape) != shape:
        raise ValueError(f"{what} has shape {tuple(dense.shape)}, expected {shape} (batch, n_items)")
    return dense


class RankingMetrics:
    """Accumulates ranking metrics over batches of users; :meth:`compute` averages them.

    Each :meth:`update` ranks a batch with one vectorised top-K selection; hits are a gather on the
    batch's dense held-out mask, so there is no Python loop over users or items.
    """

    def __init__(self, n_items: int, ks: Sequence[int] = DEFAULT_KS) -> None:
        if n_items < 1:
            raise ValueError(f"n_items must be positive, got {n_items}")
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {list(ks)}")
        self.n_items = int(n_items)
        self.ks = tuple(sorted({int(k) for k in ks}))
        self.reset()

    def reset(self) -> None:
        self.users = 0
        self.users_skipped = 0
        self._sums = {f"{name}@{k}": 0.0 for k in self.ks for name in METRIC_NAMES if name != "coverage"}
        self._covered = {k: torch.zeros(self.n_items, dtype=torch.bool) for k in self.ks}

    def topk(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Indices (batch, k) of the k best items per row, ties broken by the lower item index.

        ``torch.topk`` finds the k-th best value ``t`` per row; every item scoring above ``t`` is in the
        list, and the remaining places go to the lowest-indexed items scoring exactly ``t``. The chosen
        items are then ordered by score with a stable sort, so equal scores stay in index order.
        """
        kth = torch.topk(scores, k, dim=1, sorted=True).values[:, k - 1 : k]
        above = scores > kth
        tied = scores == kth
        places = k - above.sum(dim=1, keepdim=True)
        chosen = above | (tied & (torch.cumsum(tied, dim=1) <= places))
        # nonzero() lists each row's chosen items in increasing index order, exactly k per row
        idx = chosen.nonzero()[:, 1].view(scores.shape[0], k)
        order = torch.sort(torch.gather(scores, 1, idx), dim=1, descending=True, stable=True).indices
        return torch.gather(idx, 1, order)

    def update(
        self,
        scores: np.ndarray | torch.Tensor,
        heldout: sp.spmatrix | np.ndarray | torch.Tensor,
        exclude: sp.spmatrix | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Add a batch: ``scores`` (batch, n_items); ``heldout``/``exclude`` csr rows for the same users.

        ``scores`` is not modified. Computation runs on the device of ``scores`` (a GPU tensor stays there).
        """
        if isinstance(scores, np.ndarray) and not scores.flags.writeable:
            scores = scores.copy()  # torch refuses to wrap read-only arrays without a warning
        scores = torch.as_tensor(scores)
        if scores.dim() != 2 or scores.shape[1] != self.n_items:
            raise ValueError(f"scores must be (batch, {self.n_items}), got {tuple(scores.shape)}")
        if scores.dtype != torch.float64:
            scores = scores.float()
        if torch.isnan(scores).any():
            raise ValueError("scores contain NaN; a ranking over NaN is undefined")
        shape = (scores.shape[0], self.n_items)
        device = scores.device
        positives = _dense_rows(heldout, shape, "heldout").to(device)
        if exclude is not None:
            scores = scores.masked_fill(_dense_rows(exclude, shape, "exclude").to(device), -math.inf)

        n_pos = positives.sum(dim=1)
        keep = n_pos > 0
        self.users_skipped += int((~keep).sum())
        if not bool(keep.any()):
            return
        scores, positives, n_pos = scores[keep], positives[keep], n_pos[keep].double()
        self.users += scores.shape[0]

        max_k = min(self.ks[-1], self.n_items)
        top = self.topk(scores, max_k)
        hits = torch.gather(positives, 1, top).double()  # (batch, max_k)
        ranks = torch.arange(1, max_k + 1, device=device, dtype=torch.float64)
        gains = hits / torch.log2(ranks + 1)
        ideal = torch.cumsum(
            1.0 / torch.log2(ranks + 1), dim=0
        )  # ideal DCG with j relevant items = ideal[j-1]
        first_hit = torch.where(hits > 0, ranks, torch.full_like(ranks, math.inf)).min(dim=1).values
        for k in self.ks:
            kk = min(k, max_k)
            n_hit = hits[:, :kk].sum(dim=1)
            n_ideal = torch.clamp(n_pos, max=kk).long()
            self._sums[f"recall@{k}"] += float((n_hit / torch.clamp(n_pos, max=k)).sum())
            self._sums[f"recall_recbole@{k}"] += float((n_hit / n_pos).sum())
            self._sums[f"ndcg@{k}"] += float((gains[:, :kk].sum(dim=1) / ideal[n_ideal - 1]).sum())
            self._sums[f"mrr@{k}"] += float(torch.where(first_hit <= kk, 1.0 / first_hit, 0.0).sum())
            self._sums[f"hit@{k}"] += float((n_hit > 0).sum())
            self._covered[k][top[:, :kk].reshape(-1).cpu()] = True

    def compute(self) -> dict[str, float]:
        """Averages over the users seen so far, plus ``coverage@K``, ``users`` and ``users_skipped``."""
        out: dict[str, float] = {}
        for k in self.ks:
            for name in METRIC_NAMES:
                key = f"{name}@{k}"
                if name == "coverage":
                    out[key] = float(self._covered[k].sum()) / self.n_items
                else:
                    out[key] = self._sums[key] / self.users if self.users else float("nan")
        out["users"] = self.users
        out["users_skipped"] = self.users_skipped
        return out


class SplitSource(Protocol):
    """What :func:`evaluate_scorer` needs from a dataset bundle (``data_prep.Bundle`` provides it)."""

    n_users: int
    n_items: int

    def matrix(self, split: str) -> sp.csr_matrix: ...

    def seen(self, split: str) -> sp.csr_matrix: ...


def evaluate_matrices(
    scorer: Scorer,
    heldout: sp.csr_matrix,
    exclude: sp.csr_matrix | None = None,
    *,
    users: Iterable[int] | None = None,
    batch_size: int = 256,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = False,
) -> dict[str, float]:
    """Score users in batches with ``scorer.score(user_indices) -> (batch, n_items)``, rank against ``heldout``.

    Only users with held-out items are passed to the scorer (scoring is the expensive part for an LLM);
    the others are counted in ``users_skipped``. ``users`` restricts the evaluation to a subset.
    """
    heldout = sp.csr_matrix(heldout)
    exclude = None if exclude is None else sp.csr_matrix(exclude)
    if exclude is not None and exclude.shape != heldout.shape:
        raise ValueError(f"exclude has shape {exclude.shape}, heldout has {heldout.shape}")
    candidates = np.arange(heldout.shape[0]) if users is None else np.asarray(list(users), dtype=np.int64)
    has_heldout = np.diff(heldout.indptr)[candidates] > 0
    evaluable = candidates[has_heldout]
    metrics = RankingMetrics(heldout.shape[1], ks)
    starts = range(0, len(evaluable), batch_size)
    for start in tqdm(starts, desc="evaluating", unit="batch", disable=not progress):
        batch = evaluable[start : start + batch_size]
        metrics.update(scorer.score(batch), heldout[batch], None if exclude is None else exclude[batch])
    result = metrics.compute()
    result["users_skipped"] += int((~has_heldout).sum())
    return result


def is_leave_one_out(bundle: SplitSource) -> bool:
    """True for a next-item leave-one-out bundle: no user holds more than one valid or test interaction."""
    return all(int(np.diff(bundle.matrix(split).indptr).max(initial=0)) <= 1 for split in ("valid", "test"))


def history_splits(bundle: SplitSource, split: str) -> tuple[str, ...]:
    """The splits a scorer reads as each user's input when ranking ``split``.

    Always the training split; for the test split of a leave-one-out bundle also the validation item,
    which comes right before the test item in time (the field's protocol: predict the next item from
    everything before it). On per-user random splits valid and test are draws of the same kind, so the
    input stays the training items, as during finetuning.
    """
    if split == "test" and is_leave_one_out(bundle):
        return ("train", "valid")
    return ("train",)


def with_selection_metric(metrics: dict[str, float]) -> dict[str, float]:
    """Add CLLM4Rec's model-selection score, recall@20 + recall@40 + ndcg@100, where those are present."""
    if all(key in metrics for key in ("recall@20", "recall@40", "ndcg@100")):
        metrics["cllm4rec"] = metrics["recall@20"] + metrics["recall@40"] + metrics["ndcg@100"]
    return metrics


def evaluate_scorer(
    scorer: Scorer,
    bundle: SplitSource,
    split: str = "test",
    *,
    users: Iterable[int] | None = None,
    batch_size: int = 256,
    ks: Sequence[int] | None = None,
    exclude_seen: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate ``scorer`` on a bundle's ``split`` ("valid" or "test") under the project's protocol.

    Held-out items are ``bundle.matrix(split)``; with ``exclude_seen`` (the default) ``bundle.seen(split)``
    (training items, plus validation items for the test split) are excluded. ``ks`` defaults to
    `LOO_KS` on a leave-one-out bundle, where ``hr@K`` is added, and to `DEFAULT_KS` otherwise.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    loo = is_leave_one_out(bundle)
    ks = tuple(ks or (LOO_KS if loo else DEFAULT_KS))
    result = evaluate_matrices(
        scorer,
        bundle.matrix(split),
        bundle.seen(split) if exclude_seen else None,
        users=users,
        batch_size=batch_size,
        ks=ks,
        progress=progress,
    )
    if loo:
        result.update({f"hr@{k}": result[f"hit@{k}"] for k in ks})
    logger.info(
        "%s: %d users evaluated, %d skipped (no held-out items)",
        split,
        result["users"],
        result["users_skipped"],
    )
    return result


def evaluate_cold_items(
    scorer: Scorer,
    bundle: SplitSource,
    split: str,
    cold_items: Sequence[int] | np.ndarray,
    *,
    users: Iterable[int] | None = None,
    batch_size: int = 256,
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = True,
    cold_scorer: Scorer | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of a cold-items split from one scoring pass: ``"all"`` ranks the whole catalogue against
    every held-out item (the :func:`evaluate_scorer` protocol); ``"cold"`` ranks only ``cold_items`` (the
    split's unseen items) against the held-out interactions with them. ``cold_scorer``: the cold view's
    own scores, for a scorer that ranks a short list (a beam search, which must search the cold items
    only to list them at all); default ``scorer``'s."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    cold = np.zeros(bundle.n_items, dtype=bool)
    cold[np.asarray(cold_items, dtype=np.int64)] = True
    if not cold.any():
        raise ValueError("no cold items given: this is not a cold-items split")
    exclude, heldout = bundle.seen(split), bundle.matrix(split)
    cold_heldout = sp.csr_matrix(heldout.multiply(cold[None, :]))
    candidates = np.arange(bundle.n_users) if users is None else np.asarray(list(users), dtype=np.int64)
    evaluable = candidates[np.diff(heldout.indptr)[candidates] > 0]
    views = {"all": RankingMetrics(bundle.n_items, ks), "cold": RankingMetrics(bundle.n_items, ks)}
    for start in tqdm(
        range(0, len(evaluable), batch_size), desc="evaluating", unit="batch", disable=not progress
    ):
        batch = evaluable[start : start + batch_size]
        scores = torch.as_tensor(scorer.score(batch))
        seen = exclude[batch].toarray() != 0
        views["all"].update(scores, heldout[batch], seen)
        if cold_scorer is not None:
            scores = torch.as_tensor(cold_scorer.score(batch))
        views["cold"].update(scores, cold_heldout[batch], seen | ~cold[None, :])
    out = {name: metrics.compute() for name, metrics in views.items()}
    for result in out.values():
        result["users_skipped"] += len(candidates) - len(evaluable)
    logger.info(
        "%s: %d users (all), %d users with cold held-out items",
        split,
        out["all"]["users"],
        out["cold"]["users"],
    )
    return out


def format_table(
    rows: dict[str, dict[str, float]], columns: Sequence[str], *, name: str = "model", digits: int = 4
) -> str:
    """A plain-text table: one row per entry of ``rows``, one column per metric name (``-`` when missing)."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return str(int(value))
        if isinstance(value, (float, np.floating)):
            return f"{value:.{digits}f}"
        return str(value)

    header = [name, *columns]
    body = [[label, *(cell(metrics.get(c)) for c in columns)] for label, metrics in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def write_metrics_json(path: str | Path, metrics: dict[str, Any], **meta: Any) -> Path:
    """Write ``{**meta, "metrics": metrics}`` as JSON atomically (temp file in the same directory + rename)."""
    return write_json(path, {**meta, "metrics": metrics}, default=str)
