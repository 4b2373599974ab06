"""Cold-start split protocols: items or users that never appear in training.

``cold-items``: a seeded share of the catalogue is held out entirely. Half of the cold items (by item)
send all their interactions to valid, the other half to test, so the cold items a model is tuned on
are never the ones it is reported on; the warm interactions are split per user as ``random`` does.

``cold-users``: a seeded share of users is held out of every training corpus. Each cold user's earliest
interactions (the train share of ``ratios``, by time, at least one) are their given history and are
written to ``train.tsv`` so that every evaluator uses them as the history and excludes them from the
ranking, exactly as for warm users; the later ones are the targets, in valid for half of the cold
users and in test for the other half. The corpora (collaborative, finetune, content) leave cold users
out, and the manifest lists them, so training code can leave their history rows out too
(:func:`cold_ids`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from data_prep.errors import DataError
from data_prep.splits import SPLITS, _cut, random_split, sort_rows, time_rank

logger = logging.getLogger(__name__)


def _pick(n: int, ratio: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``ratio`` share of ``range(n)`` cut in two halves (valid, test), each sorted."""
    if not 0 < ratio < 1:
        raise DataError(f"must be strictly between 0 and 1, got {ratio}", field="cold_ratio")
    n_cold = int(np.floor(n * ratio + 0.5))
    if n_cold < 2:
        raise DataError(
            f"cold_ratio {ratio} of {n} {what} holds out {n_cold}; a cold split needs at least 2 "
            f"(one for valid, one for test): raise --cold_ratio",
            field="cold_ratio",
        )
    if n_cold >= n:
        raise DataError(
            f"cold_ratio {ratio} of {n} {what} leaves no warm {what} to train on", field="cold_ratio"
        )
    chosen = np.random.default_rng(seed).permutation(n)[:n_cold]
    half = n_cold // 2
    return np.sort(chosen[:half]), np.sort(chosen[half:])


class ColdItemSplitter:
    """``cold-items`` chunk by chunk (rows of whole users in (user, time, item) order per call): the cold
    items are picked once from the catalogue, the warm rows' random split runs on one stream."""

    def __init__(
        self, n_users: int, n_items: int, cold_ratio: float, ratios: tuple[float, float, float], seed: int
    ):
        self.n_users, self.ratios = n_users, ratios
        self.items = dict(zip(("valid", "test"), _pick(n_items, cold_ratio, seed, "items"), strict=True))
        self.home = np.full(n_items, -1, dtype=np.int64)  # -1 warm, else the split index of a cold item
        self.home[self.items["valid"]], self.home[self.items["test"]] = 1, 2
        self.rng = np.random.default_rng(seed)
        self.dropped = {"valid": 0, "test": 0}
        self.found = {"valid": False, "test": False}

    def __call__(self, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
        where = self.home[df["item"].to_numpy()]
        splits = random_split(df[where < 0].reset_index(drop=True), self.n_users, self.ratios, self.rng)
        has_train = np.zeros(self.n_users, dtype=bool)
        has_train[splits["train"]["user"].to_numpy()] = True
        for code, name in ((1, "valid"), (2, "test")):
            cold = df[where == code]
            keep = has_train[cold["user"].to_numpy()]
            self.dropped[name] += int((~keep).sum())
            splits[name] = sort_rows(pd.concat([splits[name], cold[keep]]))
            self.found[name] |= bool(keep.any())
        return splits

    def finish(self) -> dict[str, list[int]]:
        """The cold items per split, once every chunk is split; refuses a split left without any."""
        for name, dropped in self.dropped.items():
            if dropped:
                logger.warning(
                    "%s: dropped %d cold-item rows of users with no warm interaction", name, dropped
                )
        for name, found in self.found.items():
            if not found:
                raise DataError(
                    f"no {name} interaction with a cold item is left (every user of them lacks warm history): "
                    "raise --cold_ratio or use another seed",
                    field="cold_ratio",
                )
        return {name: items.tolist() for name, items in self.items.items()}


class ColdUserSplitter:
    """``cold-users`` chunk by chunk: the cold users are picked once from every user's interaction count
    (``counts``), the warm rows' random split runs on one stream."""

    def __init__(self, counts: np.ndarray, cold_ratio: float, ratios: tuple[float, float, float], seed: int):
        self.n_users, self.ratios = len(counts), ratios
        eligible = np.flatnonzero(counts >= 2)
        valid_pos, test_pos = _pick(len(eligible), cold_ratio, seed, "users with two or more interactions")
        self.users = {"valid": eligible[valid_pos], "test": eligible[test_pos]}
        self.home = np.zeros(self.n_users, dtype=np.int64)
        self.home[self.users["valid"]], self.home[self.users["test"]] = 1, 2
        share = ratios[0] / sum(ratios)
        n_history = np.clip(np.floor(counts * share + 0.5).astype(np.int64), 1, np.maximum(counts - 1, 1))
        n_target = counts - n_history
        zero = np.zeros(self.n_users, dtype=np.int64)
        self.n_valid = np.where(self.home == 1, n_target, zero)
        self.n_test = np.where(self.home == 2, n_target, zero)
        self.rng = np.random.default_rng(seed)

    def __call__(self, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
        cold = self.home[df["user"].to_numpy()] > 0
        splits = random_split(df[~cold].reset_index(drop=True), self.n_users, self.ratios, self.rng)
        cold_rows = df[cold].reset_index(drop=True)
        parts = _cut(cold_rows, time_rank(cold_rows["user"].to_numpy()), self.n_valid, self.n_test)
        return {name: sort_rows(pd.concat([splits[name], parts[name]])) for name in SPLITS}

    def finish(self) -> dict[str, list[int]]:
        return {name: users.tolist() for name, users in self.users.items()}


def cold_item_split(
    df: pd.DataFrame,
    n_users: int,
    n_items: int,
    cold_ratio: float = 0.1,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> tuple[dict[str, pd.DataFrame], dict[str, list[int]]]:
    """Hold out a seeded ``cold_ratio`` of items; returns the splits and the cold items per split.

    Held-out rows of a user who has no warm interaction left would have no history to score from: they
    are dropped and counted in the log (none on ML-100K at 10%).
    """
    splitter = ColdItemSplitter(n_users, n_items, cold_ratio, ratios, seed)
    splits = splitter(sort_rows(df))
    return splits, splitter.finish()


def cold_user_split(
    df: pd.DataFrame,
    n_users: int,
    cold_ratio: float = 0.1,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> tuple[dict[str, pd.DataFrame], dict[str, list[int]]]:
    """Hold out a seeded ``cold_ratio`` of users; returns the splits and the cold users per split.

    A cold user needs two interactions (one history, one target); users with fewer are never chosen.
    """
    df = sort_rows(df)
    splitter = ColdUserSplitter(np.bincount(df["user"], minlength=n_users), cold_ratio, ratios, seed)
    splits = splitter(df)
    return splits, splitter.finish()


def cold_ids(manifest: dict[str, Any], kind: str, split: str | None = None) -> np.ndarray:
    """Indices of the cold ``kind`` ("items" or "users") of ``split`` (valid/test; None: both) recorded
    in a bundle's manifest; empty for a warm split."""
    if kind not in ("items", "users"):
        raise ValueError(f"kind must be 'items' or 'users', got {kind!r}")
    cold = manifest.get("split", {}).get(f"cold_{kind}")
    if not cold:
        return np.zeros(0, dtype=np.int64)
    names = SPLITS[1:] if split is None else (split,)
    return np.sort(np.concatenate([np.asarray(cold[name]["index"], dtype=np.int64) for name in names]))
