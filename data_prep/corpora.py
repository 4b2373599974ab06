"""The three corpora of the bundle as Arrow tables of rows ``{kind, user, item, prompt, main}``.

Placeholders are ``<user_{index}>`` / ``<item_{index}>`` with contiguous indices; ``-1`` marks a
user or item column that does not apply to a row.

Documents are built column-wise in Arrow, not row by row in Python: a chunk's item placeholders are
taken from a cached table of names, cut into one list per user at the user boundaries of the sorted
rows and joined with spaces (``binary_join``), and prompts are the template's literal pieces
concatenated with the user / item / history columns. The cost is linear in a chunk's rows, whatever
the number of users or items, and no Python object is made per row. A template whose fields carry a
format spec or conversion (``{user:>5}``, ``{user!r}``) is formatted row by row, as ``str.format``
would (the same strings, only slower).
"""

from __future__ import annotations

import string
from functools import lru_cache

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Features, Value

from common.placeholders import ITEM, placeholder
from data_prep.splits import random_rank, sort_rows
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
SCHEMA = FEATURES.arrow_schema
CORPORA = ("collaborative", "content", "finetune")


def _table(kind: str | pa.Array, user, item, prompt: pa.Array, main: pa.Array) -> pa.Table:
    """Columns -> one corpus table (``user``/``item``: an index array or one int for every row)."""
    n = len(prompt)
    kinds = kind if isinstance(kind, pa.Array) else pa.array([kind] * n, pa.string())
    users = np.broadcast_to(np.asarray(user, dtype=np.int64), (n,)).copy()
    items = np.broadcast_to(np.asarray(item, dtype=np.int64), (n,)).copy()
    return pa.table([kinds, users, items, prompt, main], schema=SCHEMA)


@lru_cache(maxsize=8)
def _names(kind: str, size: int) -> pa.Array:
    """``placeholder(kind, i)`` for i in 0..size-1 (sizes are powers of two, so few are ever made)."""
    return pa.array([placeholder(kind, i) for i in range(size)], pa.string())


def placeholders(kind: str, indices: np.ndarray) -> pa.Array:
    """One placeholder per index (``<item_3>``), in Arrow."""
    indices = np.asarray(indices, dtype=np.int64)
    size = 1 << max(10, int(indices.max()).bit_length()) if len(indices) else 1
    return _names(kind, size).take(pa.array(indices))


def histories(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, pa.Array]:
    """Rows grouped by user (sorted by user, each user's rows in time order) -> the users, once each,
    and each user's item placeholders joined by spaces, oldest first."""
    users = np.asarray(users, dtype=np.int64)
    if not len(users):
        return users, pa.array([], pa.string())
    starts = np.flatnonzero(users[1:] != users[:-1]) + 1
    offsets = np.concatenate([[0], starts, [len(users)]]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), placeholders(ITEM, items))
    return users[offsets[:-1]], pc.binary_join(lists, " ")


def _plain(template: str) -> list[tuple[str, str | None]] | None:
    """The template's (literal, field) pieces, or None when a field has a format spec or conversion."""
    pieces = list(string.Formatter().parse(template))
    if any(spec or conversion for _, name, spec, conversion in pieces if name is not None):
        return None
    return [(literal, name) for literal, name, _, _ in pieces]


def fill(template: str, n: int, **columns: np.ndarray | pa.Array) -> pa.Array:
    """``template.format(**row)`` for each of ``n`` rows of ``columns`` (int index arrays, or string
    arrays such as histories)."""
    pieces = _plain(template)
    if pieces is None:  # format specs or conversions: str.format row by row, on Python values
        values = {
            name: column.to_pylist() if isinstance(column, pa.Array) else np.asarray(column).tolist()
            for name, column in columns.items()
        }
        rows = (dict(zip(values, row, strict=True)) for row in zip(*values.values(), strict=True))
        return pa.array(
            [template.format(**row) for row in rows] if values else [template.format()] * n, pa.string()
        )
    parts: list[str | pa.Array] = []
    for literal, name in pieces:
        if literal:
            parts.append(literal)
        if name is not None:
            column = columns[name]
            if not isinstance(column, pa.Array):
                column = pc.cast(pa.array(np.asarray(column, dtype=np.int64)), pa.string())
            parts.append(column)
    if not any(isinstance(part, pa.Array) for part in parts):
        return pa.array(["".join(parts)] * n, pa.string())  # type: ignore[arg-type]
    return pc.binary_join_element_wise(*parts, "")


def collaborative_corpus(train: pd.DataFrame, templates: Templates) -> pa.Table:
    """One document per user with training items: its training items in time order."""
    train = sort_rows(train)
    users, docs = histories(train["user"].to_numpy(), train["item"].to_numpy())
    prompts = fill(templates.collaborative, len(users), user=users)
    return _table("collaborative", users, -1, prompts, docs)


def finetune_rng(seed: int) -> np.random.Generator:
    """The finetune masks' stream, apart from the split's."""
    return np.random.default_rng([seed, 1])


def finetune_corpus(
    train: pd.DataFrame, templates: Templates, seed: int | np.random.Generator, keep: float = 0.8
) -> pa.Table:
    """One example per user: a seeded ``keep`` share (at least one) of training items in the prompt,
    all training items as the multinomial target. Training re-draws this mask every epoch. A Generator
    (from :func:`finetune_rng`) runs on across chunks of whole users."""
    train = sort_rows(train)
    users, items = train["user"].to_numpy(), train["item"].to_numpy()
    n_keep = np.maximum(1, np.floor(np.bincount(users) * keep + 0.5).astype(np.int64))
    rng = finetune_rng(seed) if isinstance(seed, int) else seed
    shown = random_rank(users, rng) < n_keep[users]  # every user shows at least its rank-0 item
    prompt_users, history = histories(users[shown], items[shown])
    target_users, target = histories(users, items)
    if not np.array_equal(prompt_users, target_users):
        raise AssertionError("a user without a shown item")
    prompts = fill(templates.finetune, len(prompt_users), user=prompt_users, history=history)
    return _table("finetune", target_users, -1, prompts, target)


def content_corpus(
    templates: Templates,
    item_text: list[str],
    user_text: list[str],
    reviews: pd.DataFrame | None = None,
) -> pa.Table:
    """Reviews (``user``, ``item``, ``text`` indexed rows) when there are any; otherwise one
    document per item and per user that has a non-empty description."""
    if reviews is not None and len(reviews):
        users, items = reviews["user"].to_numpy(), reviews["item"].to_numpy()
        prompts = fill(templates.review, len(reviews), user=users, item=items)
        texts = pa.array(reviews["text"], pa.string())
        return _table("review", users, items, prompts, texts)
    items = np.array([i for i, text in enumerate(item_text) if text], dtype=np.int64)
    users = np.array([u for u, text in enumerate(user_text) if text], dtype=np.int64)
    prompts = pa.concat_arrays(
        [fill(templates.item, len(items), item=items), fill(templates.user, len(users), user=users)]
    )
    return _table(
        pa.array(["item"] * len(items) + ["user"] * len(users), pa.string()),
        np.concatenate([np.full(len(items), -1), users]),
        np.concatenate([items, np.full(len(users), -1)]),
        prompts,
        pa.array([item_text[i] for i in items] + [user_text[u] for u in users], pa.string()),
    )
