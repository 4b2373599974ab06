"""The three corpora of the bundle as ``datasets.Dataset`` rows ``{kind, user, item, prompt, main}``.

Placeholders are ``<user_{index}>`` / ``<item_{index}>`` with contiguous indices; ``-1`` marks a
user or item column that does not apply to a row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from datasets import Dataset, Features, Value

from common.placeholders import placeholder
from data_prep.splits import random_rank, sort_rows, user_histories
from data_prep.templates import Templates

FEATURES = Features(
    {
        "kind": Value("string"),
        "user": Value("int64"),
        "item": Value("int64"),
        "prompt": Value("string"),
        "main": Value("string"),
    }
)
CORPORA = ("collaborative", "content", "finetune")


def _dataset(kind: list[str] | str, user, item, prompt: list[str], main: list[str]) -> Dataset:
    """Columns -> Dataset through one Arrow table (``from_dict(features=...)`` encodes row by row,
    ~20x slower at 500k rows)."""
    n = len(prompt)
    columns = {
        "kind": [kind] * n if isinstance(kind, str) else list(kind),
        "user": np.broadcast_to(np.asarray(user, dtype=np.int64), (n,)),
        "item": np.broadcast_to(np.asarray(item, dtype=np.int64), (n,)),
        "prompt": list(prompt),
        "main": list(main),
    }
    return Dataset(pa.Table.from_pydict(columns, schema=FEATURES.arrow_schema))


def _histories(train: pd.DataFrame) -> pd.Series:
    """user -> placeholders of the user's items joined by spaces, oldest first, for users with items.

    Joins Python lists of names per user: pandas' groupby-join iterates Arrow strings one by one and
    is an order of magnitude slower on a million rows.
    """
    if not len(train):
        return pd.Series([], dtype=object)
    names = np.array([placeholder("item", i) for i in range(int(train["item"].max()) + 1)], dtype=object)
    histories = user_histories(train, int(train["user"].max()) + 1)
    users = [user for user, items in enumerate(histories) if items]
    joined = [" ".join(names[histories[user]].tolist()) for user in users]
    return pd.Series(joined, index=np.asarray(users, dtype=np.int64), dtype=object)


def collaborative_corpus(train: pd.DataFrame, templates: Templates) -> Dataset:
    """One document per user with training items: its training items in time order."""
    histories = _histories(sort_rows(train))
    prompts = [templates.collaborative.format(user=u) for u in histories.index]
    return _dataset("collaborative", histories.index.to_numpy(), -1, prompts, histories.tolist())


def finetune_rng(seed: int) -> np.random.Generator:
    """The finetune masks' stream, apart from the split's."""
    return np.random.default_rng([seed, 1])


def finetune_corpus(
    train: pd.DataFrame, templates: Templates, seed: int | np.random.Generator, keep: float = 0.8
) -> Dataset:
    """One example per user: a seeded ``keep`` share (at least one) of training items in the prompt,
    all training items as the multinomial target. Training re-draws this mask every epoch. A Generator
    (from :func:`finetune_rng`) runs on across chunks of whole users."""
    train = sort_rows(train)
    users = train["user"].to_numpy()
    n_keep = np.maximum(1, np.floor(np.bincount(users) * keep + 0.5).astype(np.int64))
    rng = finetune_rng(seed) if isinstance(seed, int) else seed
    shown = random_rank(users, rng) < n_keep[users]
    history = _histories(train[shown])
    target = _histories(train)
    prompts = [
        templates.finetune.format(user=u, history=h) for u, h in zip(history.index, history, strict=True)
    ]
    return _dataset("finetune", target.index.to_numpy(), -1, prompts, target.tolist())


def content_corpus(
    templates: Templates,
    item_text: list[str],
    user_text: list[str],
    reviews: pd.DataFrame | None = None,
) -> Dataset:
    """Reviews (``user``, ``item``, ``text`` indexed rows) when there are any; otherwise one
    document per item and per user that has a non-empty description."""
    if reviews is not None and len(reviews):
        prompts = [
            templates.review.format(user=u, item=i)
            for u, i in zip(reviews["user"], reviews["item"], strict=True)
        ]
        return _dataset(
            "review",
            reviews["user"].to_numpy(),
            reviews["item"].to_numpy(),
            prompts,
            reviews["text"].tolist(),
        )
    items = [i for i, text in enumerate(item_text) if text]
    users = [u for u, text in enumerate(user_text) if text]
    return _dataset(
        ["item"] * len(items) + ["user"] * len(users),
        np.array([-1] * len(items) + users, dtype=np.int64),
        np.array(items + [-1] * len(users), dtype=np.int64),
        [templates.item.format(item=i) for i in items] + [templates.user.format(user=u) for u in users],
        [item_text[i] for i in items] + [user_text[u] for u in users],
    )
