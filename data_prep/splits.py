"""Per-user split protocols over indexed interactions (``user``, ``item``, ``rating``, ``timestamp``).

Each protocol ranks every user's interactions (randomly or by time) and cuts them into
train/valid/test counts, so that a user who appears in valid or test always keeps at least one
training interaction. Rows are first put in (user, timestamp, item) order, the order of the
bundle's split files; every later step keeps it, so a build sorts the log once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep.errors import DataError

SPLITS = ("train", "valid", "test")


def _in_order(users: np.ndarray, times: np.ndarray, items: np.ndarray) -> bool:
    du, dt, di = np.diff(users), np.diff(times), np.diff(items)
    return bool(((du > 0) | ((du == 0) & ((dt > 0) | ((dt == 0) & (di >= 0))))).all())


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by user, then time, then item, with a fresh 0..n-1 index (a no-op sort when already so)."""
    users, times, items = (df[c].to_numpy() for c in ("user", "timestamp", "item"))
    if not _in_order(users, times, items):
        df = df.iloc[np.lexsort((items, times, users))]
    return df.reset_index(drop=True)


def user_histories(df: pd.DataFrame, n_users: int) -> list[list[int]]:
    """Each user's items, oldest first (ties keep the frame's order), indexed by user."""
    ordered = df.sort_values(["user", "timestamp"], kind="stable")
    users, items = ordered["user"].to_numpy(), ordered["item"].to_numpy()
    histories: list[list[int]] = [[] for _ in range(n_users)]
    bounds = np.flatnonzero(np.diff(users)) + 1
    for chunk_users, chunk_items in zip(np.split(users, bounds), np.split(items, bounds), strict=True):
        if len(chunk_users):
            histories[int(chunk_users[0])] = chunk_items.tolist()
    return histories


def _starts(users: np.ndarray) -> np.ndarray:
    """Per user, the position of its first row in a user-sorted array (indexable by user id)."""
    counts = np.bincount(users) if len(users) else np.zeros(0, dtype=np.int64)
    return np.cumsum(counts) - counts


def time_rank(users: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each user of a user-sorted (time-ordered) array."""
    return np.arange(len(users)) - _starts(users)[users]


def random_rank(users: np.ndarray, seed: int | list[int] | np.random.Generator) -> np.ndarray:
    """A seeded random permutation rank within each user of a user-sorted array.

    A ``Generator`` continues its stream: ranking consecutive chunks of whole users with one generator
    gives the ranks of the whole array in one call (how the out-of-core build stays identical).

    One int64 argsort on ``user << 31 | random`` instead of a two-key lexsort (several times faster
    at millions of rows); the stable sort keeps it deterministic even on equal random draws.
    """
    noise = np.random.default_rng(seed).integers(0, 2**31, size=len(users))
    order = np.argsort((users.astype(np.int64) << 31) | noise, kind="stable")
    rank = np.empty(len(users), dtype=np.int64)
    rank[order] = np.arange(len(users)) - _starts(users)[users[order]]
    return rank


def _cut(
    df: pd.DataFrame, rank: np.ndarray, n_valid: np.ndarray, n_test: np.ndarray
) -> dict[str, pd.DataFrame]:
    """Per user, rows ranked last ``n_test`` go to test, the ``n_valid`` before them to valid, the
    rest to train; row order (user, time, item) is kept."""
    users = df["user"].to_numpy()
    n_train = np.bincount(users)[users] - n_valid[users] - n_test[users]
    label = np.where(rank < n_train, 0, np.where(rank < n_train + n_valid[users], 1, 2))
    return {name: df[label == code].reset_index(drop=True) for code, name in enumerate(SPLITS)}


def _ratio_counts(counts: np.ndarray, ratios: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-user valid/test sizes from ratios (rounded half up), never taking a user's last training item."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError(
            f"split ratios must be three non-negative numbers, got {list(ratios)}", field="ratios"
        )
    _, valid, test = (r / sum(ratios) for r in ratios)
    n_test = np.minimum(np.floor(counts * test + 0.5).astype(np.int64), np.maximum(counts - 1, 0))
    n_valid = np.minimum(np.floor(counts * valid + 0.5).astype(np.int64), np.maximum(counts - 1 - n_test, 0))
    return n_valid, n_test


def random_split(
    df: pd.DataFrame,
    n_users: int,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int | np.random.Generator = 0,
) -> dict[str, pd.DataFrame]:
    """Per-user random split by ratios, seeded (a Generator: continued, see :func:`random_rank`)."""
    df = sort_rows(df)
    n_valid, n_test = _ratio_counts(np.bincount(df["user"], minlength=n_users), ratios)
    return _cut(df, random_rank(df["user"].to_numpy(), seed), n_valid, n_test)


def temporal_split(
    df: pd.DataFrame, n_users: int, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, pd.DataFrame]:
    """Per-user temporal split: each user's earliest interactions train, the latest test."""
    df = sort_rows(df)
    n_valid, n_test = _ratio_counts(np.bincount(df["user"], minlength=n_users), ratios)
    return _cut(df, time_rank(df["user"].to_numpy()), n_valid, n_test)


def leave_one_out(df: pd.DataFrame, n_users: int) -> dict[str, pd.DataFrame]:
    """Last interaction to test, second-to-last to valid; users with one or two interactions keep
    their first one in train (two: train + test). Equal timestamps fall back to item order."""
    df = sort_rows(df)
    counts = np.bincount(df["user"], minlength=n_users)
    n_test = (counts >= 2).astype(np.int64)
    n_valid = (counts >= 3).astype(np.int64)
    return _cut(df, time_rank(df["user"].to_numpy()), n_valid, n_test)


class WarmSplitter:
    """``random``, ``temporal`` or ``loo`` applied chunk by chunk: each call takes rows of whole users
    in (user, time, item) order, and the random split's stream runs on across calls."""

    def __init__(self, protocol: str, n_users: int, ratios: tuple[float, float, float], seed: int):
        if protocol not in ("random", "temporal", "loo"):
            raise DataError(f"unknown split {protocol!r}", field="split")
        self.protocol, self.n_users, self.ratios = protocol, n_users, ratios
        self.rng = np.random.default_rng(seed)

    def __call__(self, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
        if self.protocol == "random":
            return random_split(df, self.n_users, self.ratios, self.rng)
        if self.protocol == "temporal":
            return temporal_split(df, self.n_users, self.ratios)
        return leave_one_out(df, self.n_users)

    def finish(self) -> dict[str, list[int]]:
        """Nothing is held out cold (the cold splitters return their cold ids here)."""
        return {}
