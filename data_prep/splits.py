"""Per-user split protocols over indexed interactions (``user``, ``item``, ``rating``, ``timestamp``).

Each protocol orders every user's interactions (randomly or by time) and cuts them into
train/valid/test counts, so that a user who appears in valid or test always keeps at least one
training interaction.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep.errors import DataError

SPLITS = ("train", "valid", "test")


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Split files list rows by user, then time, then item (numpy lexsort: faster than sort_values)."""
    order = np.lexsort((df["item"].to_numpy(), df["timestamp"].to_numpy(), df["user"].to_numpy()))
    return df.iloc[order].reset_index(drop=True)


def _cut(
    df: pd.DataFrame, order: np.ndarray, n_valid: np.ndarray, n_test: np.ndarray
) -> dict[str, pd.DataFrame]:
    """Rows in ``order`` are grouped by user; per user the last ``n_test`` go to test, the
    ``n_valid`` before them to valid, the rest to train."""
    users = df["user"].to_numpy()[order]
    counts = np.bincount(users)
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(order)) - starts[users]
    n_train = counts[users] - n_valid[users] - n_test[users]
    label = np.where(rank < n_train, 0, np.where(rank < n_train + n_valid[users], 1, 2))
    out = {}
    for code, name in enumerate(SPLITS):
        out[name] = sort_rows(df.iloc[order[label == code]])
    return out


def _ratio_counts(counts: np.ndarray, ratios: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-user valid/test sizes from ratios (rounded half up), never taking a user's last training item."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError(
            f"split ratios must be three non-negative numbers, got {list(ratios)}", field="ratios"
        )
    train, valid, test = (r / sum(ratios) for r in ratios)
    n_test = np.minimum(np.floor(counts * test + 0.5).astype(np.int64), np.maximum(counts - 1, 0))
    n_valid = np.minimum(np.floor(counts * valid + 0.5).astype(np.int64), np.maximum(counts - 1 - n_test, 0))
    return n_valid, n_test


def random_split(
    df: pd.DataFrame, n_users: int, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, pd.DataFrame]:
    """Per-user random split by ratios, seeded."""
    key = np.random.default_rng(seed).random(len(df))
    order = np.lexsort((key, df["user"].to_numpy()))
    n_valid, n_test = _ratio_counts(np.bincount(df["user"], minlength=n_users), ratios)
    return _cut(df, order, n_valid, n_test)


def _time_order(df: pd.DataFrame) -> np.ndarray:
    """Rows grouped by user, by timestamp within a user (ties in input order)."""
    return np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy(), df["user"].to_numpy()))


def temporal_split(
    df: pd.DataFrame, n_users: int, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, pd.DataFrame]:
    """Per-user temporal split: each user's earliest interactions train, the latest test."""
    n_valid, n_test = _ratio_counts(np.bincount(df["user"], minlength=n_users), ratios)
    return _cut(df, _time_order(df), n_valid, n_test)


def leave_one_out(df: pd.DataFrame, n_users: int) -> dict[str, pd.DataFrame]:
    """Last interaction to test, second-to-last to valid; users with one or two interactions keep
    their first one in train (two: train + test)."""
    counts = np.bincount(df["user"], minlength=n_users)
    n_test = (counts >= 2).astype(np.int64)
    n_valid = (counts >= 3).astype(np.int64)
    return _cut(df, _time_order(df), n_valid, n_test)
