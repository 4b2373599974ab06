"""The second half of every build, whichever engine filtered and indexed the log.

An engine (in memory, :mod:`data_prep.build`; out of core, :mod:`data_prep.outofcore`) hands over an
:class:`IndexedLog`: id maps, per-user counts and the rows in (user, time, item) order as chunks of
whole users. From here on both run the same code: split each chunk, append its split rows and its
collaborative and finetune documents to the bundle, then the content corpus. The split and finetune
random streams run on across chunks (:func:`data_prep.splits.random_rank`), so the bundle does not
depend on where the chunks were cut: that is what makes the two engines' bundles byte-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from data_prep.bundle import BundleWriter
from data_prep.cold import ColdItemSplitter, ColdUserSplitter
from data_prep.corpora import collaborative_corpus, content_corpus, finetune_corpus, finetune_rng
from data_prep.splits import WarmSplitter
from data_prep.templates import Templates


class Reviews(Protocol):
    """Review texts of an engine: told the training pairs chunk by chunk, then yields the reviews of
    those pairs (``user``, ``item``, ``text``; non-empty texts) in (user, item, file) order."""

    def add_train(self, train: pd.DataFrame) -> None: ...

    def chunks(self) -> Iterator[pd.DataFrame]: ...


@dataclass
class IndexedLog:
    """A filtered log with contiguous ids. ``chunks()`` yields ``user, item, rating, timestamp`` rows
    sorted by (user, timestamp, item), each chunk holding whole users; ``counts`` is the number of rows
    of each user index; ``filters`` goes into the manifest."""

    user_ids: list[str]
    item_ids: list[str]
    counts: np.ndarray
    chunks: Callable[[], Iterator[pd.DataFrame]]
    filters: dict[str, Any] = field(default_factory=dict)
    reviews: Reviews | None = None


Splitter = WarmSplitter | ColdItemSplitter | ColdUserSplitter


def splitter(
    protocol: str, log: IndexedLog, ratios: tuple[float, float, float], seed: int, cold_ratio: float
) -> Splitter:
    """The chunk-by-chunk splitter of a protocol (every one but ``presplit``)."""
    if protocol == "cold-items":
        return ColdItemSplitter(len(log.user_ids), len(log.item_ids), cold_ratio, ratios, seed)
    if protocol == "cold-users":
        return ColdUserSplitter(log.counts, cold_ratio, ratios, seed)
    return WarmSplitter(protocol, len(log.user_ids), ratios, seed)


def write_rows(
    writer: BundleWriter,
    parts: Iterable[dict[str, pd.DataFrame]],
    n_users: int,
    templates: Templates,
    seed: int,
    keep: float,
    untrained_users: np.ndarray | None = None,
    reviews: Reviews | None = None,
) -> np.ndarray:
    """Append each chunk's splits and its collaborative and finetune documents; returns the rows per
    user over all splits. Users in ``untrained_users`` (cold users: their history is given at
    evaluation, never trained on) stay out of the corpora."""
    per_user = np.zeros(n_users, dtype=np.int64)
    rng = finetune_rng(seed)
    for splits in parts:
        writer.append_splits(splits)
        for part in splits.values():
            per_user += np.bincount(part["user"].to_numpy(), minlength=n_users)
        train = splits["train"]
        if untrained_users is not None and len(untrained_users):
            train = train[~np.isin(train["user"].to_numpy(), untrained_users)]
        if not len(train):
            continue
        if reviews is not None:
            reviews.add_train(train)
        writer.append_corpus("collaborative", collaborative_corpus(train, templates))
        writer.append_corpus("finetune", finetune_corpus(train, templates, rng, keep))
    return per_user


def write_content(
    writer: BundleWriter,
    templates: Templates,
    item_text: list[str],
    user_text: list[str],
    reviews: Reviews | None = None,
) -> None:
    """The content corpus: the reviews of training pairs when there are any, else item and user texts."""
    wrote = False
    for chunk in reviews.chunks() if reviews is not None else ():
        if len(chunk):
            writer.append_corpus("content", content_corpus(templates, [], [], chunk))
            wrote = True
    if not wrote:
        writer.append_corpus("content", content_corpus(templates, item_text, user_text))
