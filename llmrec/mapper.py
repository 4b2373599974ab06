"""An item's ID-token rows from its text: the text-to-ID mapper and the growth of the item family.

A trained recommender scores item ``i`` with its row of the item head (the collaborative item
embedding for the tied head; own weights and a bias for the untied one) and reads it in a history
through its collaborative and content embeddings. A new item has none of these trained.
:class:`TextToID` fills them in: a ridge regression from a sentence embedding of the item's text
(MiniLM by default, ``llmrec.indexing.encoders``) to the rows of the *warm* items, fit in closed form
with the ridge penalty chosen by exact leave-one-out error; adding items is one encoder pass and one
matrix product. :func:`extend_items` grows the model's item family (and its prior) so that
`llmrec.Recommender.add_items` can append items; the fold-in alternative, which needs the training
stack, is `llmrec.coldstart`.

The ridge solver is written here rather than taken from scikit-learn: it is a dozen lines of torch,
the leave-one-out choice of the penalty falls out of the same SVD, and it adds no dependency.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmrec.model import CLLM4Rec
from llmrec.tokens import RecVocab

if TYPE_CHECKING:
    from llmrec.indexing.base import ItemIndex

logger = logging.getLogger(__name__)

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


# ---------------------------------------------------------------------------------- item rows
def item_rows(model: CLLM4Rec) -> torch.Tensor:
    """Every trained row an item owns, side by side: (n_items, width) =
    [collaborative embedding | content embedding | the head's own rows (`ItemHead.rows`: an untied head's
    row and bias)]."""
    parts = [model.collab.family_weight("item"), model.content.family_weight("item")]
    return torch.cat([p.detach().float() for p in parts] + [model.head.rows(model.item_table())], dim=1)


@torch.no_grad()
def set_item_rows(model: CLLM4Rec, items: Sequence[int] | np.ndarray, rows: torch.Tensor) -> None:
    """Write rows laid out as :func:`item_rows` into the model for ``items``."""
    index = torch.as_tensor(np.asarray(items, dtype=np.int64))
    hidden = model.collab.family_weight("item").shape[1]
    tables = [model.collab.family_weight("item"), model.content.family_weight("item")]
    for n, table in enumerate(tables):
        table[index.to(table.device)] = rows[:, n * hidden : (n + 1) * hidden].to(table)
    model.head.set_rows(index, rows[:, len(tables) * hidden :])


# ---------------------------------------------------------------------------------- ridge mapper
@dataclass
class Ridge:
    """``y = (x - x_mean) @ weight + y_mean``, fit in closed form; ``l2`` chosen by leave-one-out error."""

    weight: torch.Tensor  # (in, out)
    x_mean: torch.Tensor  # (in,)
    y_mean: torch.Tensor  # (out,)
    l2: float

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, l2: Sequence[float] | float = L2_GRID) -> Ridge:
        """Fit on rows ``x`` (n, in) -> ``y`` (n, out); with several ``l2`` values keep the one whose
        exact leave-one-out mean squared error (from one SVD of the centred ``x``) is lowest."""
        x, y = x.double(), y.double()
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean
        u, s, vt = torch.linalg.svd(xc, full_matrices=False)
        uty = u.T @ yc
        grid = [float(l2)] if isinstance(l2, (int, float)) else [float(v) for v in l2]
        errors = []
        for lam in grid:
            shrink = s**2 / (s**2 + lam)
            fitted = u @ (shrink[:, None] * uty)
            leverage = (u**2 * shrink).sum(1) + 1.0 / len(x)  # + the intercept's leverage
            errors.append(float((((yc - fitted) / (1 - leverage)[:, None]) ** 2).mean()))
        best = grid[int(np.argmin(errors))]
        weight = vt.T @ ((s / (s**2 + best))[:, None] * uty)
        logger.info(
            "ridge: l2 %s chosen by leave-one-out MSE (%s)", best, dict(zip(grid, errors, strict=True))
        )
        return cls(weight.float(), x_mean.float(), y_mean.float(), best)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.x_mean) @ self.weight + self.y_mean

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}weight": self.weight,
            f"{prefix}x_mean": self.x_mean,
            f"{prefix}y_mean": self.y_mean,
            f"{prefix}l2": torch.tensor(self.l2),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "") -> Ridge:
        return cls(
            state[f"{prefix}weight"],
            state[f"{prefix}x_mean"],
            state[f"{prefix}y_mean"],
            float(state[f"{prefix}l2"]),
        )


def item_texts(titles: Sequence[str], texts: Sequence[str] | None = None) -> list[str]:
    """What the mapper reads for each item: its text when it has one (ML-100K: title, year and genres),
    else its title."""
    if texts is None:
        return list(titles)
    return [text or title for title, text in zip(titles, texts, strict=True)]


def embed_texts(texts: Sequence[str], encoder: str = "minilm") -> np.ndarray:
    """Text embeddings with the process's shared ``encoder`` (loaded on first use, then kept)."""
    from llmrec.indexing.encoders import mean_pooled_embeddings, shared_encoder

    # small batches of texts of equal token counts: the least padding
    return mean_pooled_embeddings(*shared_encoder(encoder), list(texts), batch_size=16)


@dataclass
class TextToID:
    """Text embedding -> every ID-token row of an item (:func:`item_rows`), learned on warm items."""

    ridge: Ridge
    encoder: str = "minilm"

    @classmethod
    def fit(
        cls,
        model: CLLM4Rec,
        embeddings: torch.Tensor | np.ndarray,
        warm: Sequence[int] | np.ndarray,
        encoder: str = "minilm",
        l2: Sequence[float] | float = L2_GRID,
    ) -> TextToID:
        """``embeddings`` (n_items, dim): text embeddings of the model's items (only ``warm`` rows are used)."""
        warm = np.asarray(warm, dtype=np.int64)
        x = torch.as_tensor(np.asarray(embeddings))[warm]
        return cls(Ridge.fit(x, item_rows(model)[warm].cpu(), l2), encoder)

    def apply(
        self, model: CLLM4Rec, items: Sequence[int] | np.ndarray, embeddings: torch.Tensor | np.ndarray
    ) -> None:
        """Give ``items`` the rows predicted from their text embeddings (one matrix product)."""
        set_item_rows(model, items, self.ridge(torch.as_tensor(np.asarray(embeddings))))

    @classmethod
    def fit_on_texts(
        cls, model: CLLM4Rec, texts: Sequence[str], warm: Sequence[int] | np.ndarray, encoder: str = "minilm"
    ) -> TextToID:
        """Embed every item's text with ``encoder``, then :meth:`fit` on the ``warm`` items."""
        return cls.fit(model, embed_texts(texts, encoder), warm, encoder)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings with this mapper's encoder (:func:`embed_texts`)."""
        return embed_texts(texts, self.encoder)

    def save(self, path: str | Path) -> None:
        save_file(self.ridge.state_dict(), str(path), metadata={"encoder": self.encoder})

    @classmethod
    def load(cls, path: str | Path) -> TextToID:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            encoder = (f.metadata() or {}).get("encoder", "minilm")
        return cls(Ridge.from_state_dict(load_file(str(path))), encoder)


def neighbour_rows(
    model: CLLM4Rec,
    embeddings: torch.Tensor | np.ndarray,
    warm: Sequence[int] | np.ndarray,
    items: Sequence[int] | np.ndarray,
    k: int = 20,
) -> None:
    """The non-parametric alternative to :class:`TextToID`: each new item's rows are the mean of the rows
    of its ``k`` warm text neighbours (cosine of the text embeddings), weighted by similarity."""
    emb = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings)).float(), dim=1)
    warm = torch.as_tensor(np.asarray(warm, dtype=np.int64))
    items = np.asarray(items, dtype=np.int64)
    sims = emb[torch.as_tensor(items)] @ emb[warm].T
    top = torch.topk(sims, min(k, len(warm)), dim=1)
    weights = top.values.clamp(min=1e-6)
    weights = weights / weights.sum(1, keepdim=True)
    rows = item_rows(model)[warm].cpu()
    set_item_rows(model, items, torch.einsum("nk,nkw->nw", weights, rows[top.indices]))


# ---------------------------------------------------------------------------------- catalogue growth
@torch.no_grad()
def extend_items(model: CLLM4Rec, n_new: int, index: ItemIndex | None = None) -> range:
    """Grow the model's item family by ``n_new`` tokens (rows zero until set); returns the new indices.

    The rows of existing items are copied unchanged, so their scores do not move; the head grows
    (`ItemHead.grow`: zero untied rows, a prior's item-item matrix with zeros), and the history pool reads
    the grown collaborative table, so both stay valid.

    A model with semantic IDs needs the new items' codes: ``index``, its item index grown by them
    (`llmrec.indexing.newitems.add_items`), becomes ``model.item_index``. The item family sits below the
    semantic-ID family, so the semantic token ids move up by ``n_new``; the semantic tables (one per
    family) do not change, so neither do the codes' scores, but token ids computed before (prompt
    builders, `llmrec.decoding.SemanticPrompts`) must be rebuilt.
    """
    vocab = model.vocab
    if n_new < 1:
        raise ValueError(f"n_new must be positive, got {n_new}")
    if vocab.semantic_codebooks and (index is None or index.n_items != vocab.n_items + n_new):
        raise ValueError(
            f"adding {n_new} items to a model with semantic IDs needs their codes: its item index grown "
            f"to {vocab.n_items + n_new} items (llmrec.indexing.newitems.add_items)"
        )
    if index is not None and index.codebook_sizes != vocab.semantic_codebooks:
        raise ValueError(
            f"the item index's codebooks {index.codebook_sizes} are not the model's {vocab.semantic_codebooks}"
        )
    grown = RecVocab(
        vocab.base_size,
        vocab.n_users,
        vocab.n_items + n_new,
        semantic_codebooks=vocab.semantic_codebooks,
        names=vocab.names,
    )
    for view in (model.collab, model.content):
        old = view.tables["item"].weight
        grown_weight = torch.cat([old, old.new_zeros(n_new, old.shape[1])])
        view.tables["item"] = nn.Embedding.from_pretrained(grown_weight, freeze=not old.requires_grad)
        view.vocab = grown
    model.head.grow(n_new)
    model.vocab = grown
    if index is not None:
        model.item_index = index
    return range(vocab.n_items, grown.n_items)


ITEM_FIELDS = ("id", "title", "text")


def parse_new_items(
    items: Iterable[Mapping[str, Any]] | Any, known: Mapping[str, int]
) -> list[dict[str, str]]:
    """New catalogue items as ``{"id", "title", "text"}`` dicts of strings (``text`` "" when absent), from a
    list of dicts or a pandas DataFrame with those columns. A clear error names the row and field of an id
    that is missing, repeated or already in the catalogue (``known``), or a title that is empty."""
    if hasattr(items, "to_dict") and hasattr(items, "columns"):
        missing = [name for name in ITEM_FIELDS[:2] if name not in items.columns]
        if missing:
            raise ValueError(
                f"items: the DataFrame has no column {missing[0]!r} (columns: {list(items.columns)})"
            )
        items = items.to_dict("records")
    out: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for row, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"items[{row}]: expected a dict with 'id', 'title' and optionally 'text'")
        extra = sorted(set(item) - set(ITEM_FIELDS))
        if extra:
            raise ValueError(f"items[{row}]: unknown field {extra[0]!r}; expected {list(ITEM_FIELDS)}")
        values = {}
        for name in ITEM_FIELDS:
            value = item.get(name)
            if value is None or (isinstance(value, float) and np.isnan(value)):  # a DataFrame's empty cell
                value = ""
            if name == "text" and not isinstance(value, str):
                raise ValueError(f"items[{row}]: field 'text' must be a string, got {type(value).__name__}")
            values[name] = str(value).strip() if name != "text" else value
        if not values["id"]:
            raise ValueError(f"items[{row}]: field 'id' is missing or empty")
        if not values["title"]:
            raise ValueError(f"items[{row}]: field 'title' is missing or empty (item {values['id']!r})")
        if values["id"] in known:
            raise ValueError(f"items[{row}]: field 'id': {values['id']!r} is already in the catalogue")
        if values["id"] in seen:
            raise ValueError(
                f"items[{row}]: field 'id': {values['id']!r} repeats items[{seen[values['id']]}]"
            )
        seen[values["id"]] = row
        out.append(values)
    if not out:
        raise ValueError("items: no item given")
    return out
