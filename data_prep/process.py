"""Interaction filtering (rating threshold, duplicates, k-core) and contiguous id maps."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.errors import DataError

logger = logging.getLogger(__name__)


def apply_threshold(df: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    """Keep interactions rated at least ``threshold``; ``None`` keeps all (implicit feedback)."""
    if threshold is None:
        return df
    return df[df["rating"] >= threshold]


def drop_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Collapse repeated (user, item) pairs of int-coded ids to the latest (by timestamp, then file order).

    Works on int-coded ids; a hash check skips the sort when there are no duplicates (the usual case).
    """
    if df.empty:
        return df
    key = df["user"].to_numpy().astype(np.int64) * (int(df["item"].max()) + 1) + df["item"].to_numpy()
    if not pd.Series(key).duplicated().any():
        return df
    order = np.argsort(df["timestamp"].to_numpy(), kind="stable")
    latest = ~pd.Series(key[order][::-1]).duplicated().to_numpy()[::-1]
    return df.iloc[np.sort(order[latest])]


def k_core(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively drop users and items with fewer than ``k`` interactions until none are left."""
    if k <= 1:
        return df
    while True:
        user_counts = df["user"].map(df["user"].value_counts())
        item_counts = df["item"].map(df["item"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            return df
        df = df[keep.to_numpy()]


def compact(df: pd.DataFrame, column: str, ids: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Renumber ``column`` to 0..n-1 over the codes still used after filtering (order kept)."""
    used = np.unique(df[column].to_numpy())
    remap = np.full(len(ids), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return df.assign(**{column: remap[df[column].to_numpy()]}), [ids[j] for j in used]


def sorted_ids(values: pd.Series | np.ndarray) -> list[str]:
    """Unique raw ids in a stable order: numeric order when every id is a number, else lexical.

    Sorted in Arrow (its string order, by UTF-8 bytes, is Python's, by code points); ids of ASCII
    digits by their value as a 64-bit integer, ties (``7``, ``007``) by the string. Python sorts only
    what Arrow cannot: numbers beyond 64 bits or written with other digits (``str.isdigit``)."""
    unique = pd.unique(pd.Series(values, dtype=str))
    strings = pa.array(unique, pa.string())
    ascii_digits = pc.match_substring_regex(strings, r"^[0-9]+$")
    if pc.all(ascii_digits).as_py() is not False:  # True, or None: no ids at all
        try:
            numbers = pc.cast(strings, pa.uint64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:  # past 2**64
            return sorted(unique, key=lambda v: (int(v), v))
        text_rank = np.empty(len(strings), dtype=np.int64)
        text_rank[pc.sort_indices(strings).to_numpy()] = np.arange(len(strings))
        return strings.take(np.lexsort((text_rank, numbers))).to_pylist()
    if all(v.isdigit() for v in strings.filter(pc.invert(ascii_digits)).to_pylist()):
        return sorted(unique, key=lambda v: (int(v), v))
    return strings.take(pc.sort_indices(strings)).to_pylist()


def encode(values: pd.Series, ids: list[str]) -> np.ndarray:
    """Raw ids -> contiguous indices (``-1`` for ids not in ``ids``); hashes each distinct value once."""
    codes, uniques = pd.factorize(values)
    mapped = pd.Index(ids).get_indexer(uniques).astype(np.int64)[codes]
    mapped[codes < 0] = -1  # missing values
    return mapped


def align_metadata(
    meta: pd.DataFrame | None,
    key: str,
    ids: list[str],
    known: set[str],
    path: Path | None,
    text: pd.Series | None,
    extra_ok: bool = False,
) -> tuple[list[str], list[str]]:
    """Titles and texts in index order for ``ids``.

    A metadata row whose id never occurs in the raw interactions (``known``) is an error: it usually
    means a mismatched file. Rows for ids that occur but were filtered away (threshold, k-core) are
    dropped silently. Ids without metadata get an empty text (and their raw id as title) and are
    counted in one warning. ``extra_ok`` drops rows for unknown ids instead (sources whose
    metadata normally lists more items than the log, such as Amazon's).
    """
    n = len(ids)
    if meta is None:
        return list(ids), [""] * n
    unknown = ~meta[key].isin(known)
    if unknown.any() and extra_ok:
        logger.info(
            "dropped %d metadata rows of %ss without interactions in %s", int(unknown.sum()), key, path
        )
    elif unknown.any():
        line = int(meta.index[int(np.argmax(unknown.to_numpy()))])
        raise DataError(
            f"metadata for {key} {meta[key].loc[line]!r}, which has no interactions "
            f"({int(unknown.sum())} such rows in total)",
            file=path,
            line=line,
            field=key,
        )
    codes = encode(meta[key], ids)
    present = codes >= 0
    titles = np.array(ids, dtype=object)
    texts = np.full(n, "", dtype=object)
    if "title" in meta:
        found = meta["title"].to_numpy(dtype=object)[present]
        titles[codes[present]] = np.where(found != "", found, titles[codes[present]])
    if text is not None:
        texts[codes[present]] = text.to_numpy(dtype=object)[present]
    missing = n - int(present.sum())
    if missing:
        logger.warning(
            "%d of %d %ss have no metadata in %s (empty text, raw id as title)", missing, n, key, path
        )
    return titles.tolist(), texts.tolist()
