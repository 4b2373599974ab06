"""Codes for items added after an index was built, from their text, by the index's own quantizer.

A content index (``rqvae``, ``rqkmeans``) maps an item's content embedding to its code tuple: the RQ-VAE's
encoder and codebooks (artifact ``rqvae.safetensors``) or the residual k-means centroids (artifact
``rqkmeans.safetensors``) code a new embedding level by level, nearest codeword first, exactly as they
coded the indexed items before collision resolution. :func:`text_encoder` names the text encoder the
embeddings must come from (the one ``recipes/index.py`` recorded in ``index.config["encoder"]``),
:func:`quantize` codes embeddings, :func:`add_items` grows the index by unique tuples, and
:func:`build_with_new_items` builds an index whose held-out items are coded that way. The indexed items
keep their codes, so a model trained on the index ranks them as before and writes the new ones without
retraining (`llmrec.recommender.Recommender.add_items` of a generator bundle).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from common.errors import UserError
from llmrec.indexing.base import IndexData, Indexer, ItemIndex
from llmrec.indexing.encoders import MINILM
from llmrec.options import RQVAEConfig

# the content indexers and the artifact each one codes new embeddings with
CODERS = {"rqvae": "rqvae.safetensors", "rqkmeans": "rqkmeans.safetensors"}


def text_encoder(index: ItemIndex) -> str:
    """The text encoder whose embeddings ``index`` codes, when new items can be coded from their text; a
    one-line :class:`UserError` says why not otherwise.

    Only the packaged MiniLM (``minilm``, `llmrec.indexing.encoders`) is accepted: a ``backbone:SPEC``
    encoder names a model (possibly a local path) that a saved index or bundle must not make a reader load.
    """
    require_coder(index)
    encoder = index.config.get("encoder")
    if encoder is None:
        raise UserError(
            f"the {index.method} item index records no text encoder (built from content embeddings outside "
            "recipes/index.py): the embeddings of new items cannot be recomputed as its items' were"
        )
    if encoder != MINILM:
        raise UserError(
            f"the {index.method} item index was built on {encoder!r} embeddings; new items are coded only "
            f"from the packaged {MINILM!r} encoder (a saved index never names a model to load)"
        )
    return encoder


def require_coder(index: ItemIndex) -> None:
    """A one-line :class:`UserError` unless ``index`` can code content embeddings it has not seen."""
    if index.method not in CODERS:
        raise UserError(
            f"the item index ({index.method}) does not code items from their text, so new items get no "
            f"semantic ID: only a content index ({', '.join(CODERS)}) can add items without retraining"
        )
    if CODERS[index.method] not in index.artifacts or (
        index.method == "rqvae" and "in_dim" not in index.config
    ):
        raise UserError(
            f"the {index.method} item index has no {CODERS[index.method]} (or its config no in_dim): "
            "it cannot code new items"
        )


@torch.no_grad()
def quantize(index: ItemIndex, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, levels), distances (n, codebook size)) of content ``embeddings`` (n, d): each level's
    nearest codeword to what the levels before it left (the indexer's own assignment of an item before
    collision resolution; balanced k-means assigns by capacity only while building), and the distance of
    the last level's input to every last-level codeword (the collision resolvers' cost)."""
    require_coder(index)  # a content index that can code: else the one-line reason
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    if index.method == "rqvae":
        from llmrec.indexing.rqvae import RQVAE

        fields = {f.name for f in dataclasses.fields(RQVAEConfig)}
        config = RQVAEConfig(**{k: v for k, v in index.config.items() if k in fields})
        in_dim = int(index.config["in_dim"])
        _check_width(x, in_dim, index)
        model = RQVAE(in_dim, config)
        model.load_state_dict(load_safetensors(index.artifacts[CODERS["rqvae"]]))
        _, codes, residuals, _ = model.eval().quantize(model.encoder(x))
        last, books = residuals[-1], model.codebooks
    else:
        books = load_safetensors(index.artifacts[CODERS["rqkmeans"]])["codebooks"]
        _check_width(x, books.shape[-1], index)
        residual, columns = x, []
        for book in books:
            last = residual
            assign = torch.cdist(residual, book).argmin(1)
            columns.append(assign)
            residual = residual - book[assign]
        codes = torch.stack(columns, 1)
    return codes.numpy().astype(np.int64), torch.cdist(last, books[-1]).numpy()


def _check_width(x: torch.Tensor, width: int, index: ItemIndex) -> None:
    if x.ndim != 2 or x.shape[1] != width:
        raise UserError(
            f"the {index.method} item index codes {width}-wide embeddings, got shape {tuple(x.shape)}"
        )


def add_items(index: ItemIndex, embeddings: np.ndarray) -> ItemIndex:
    """``index`` with one unique code tuple appended per row of ``embeddings`` (the new items, in order).

    Each new item gets its :func:`quantize` tuple. When that tuple is taken (by an indexed item or an
    earlier new one), the new item keeps its prefix and moves to the free last-level code nearest to its
    last-level residual: what the Sinkhorn resolver's exact finishing step does for items it cannot
    separate (`llmrec.indexing.collisions.resolve_sinkhorn`), one item at a time. The prefix carries most
    of the content, and the indexed items keep their codes, so the trained model's view of them is
    unchanged (re-resolving every item would move codes the model was trained on). An index resolved with
    TIGER's extra level (``resolve="extra_level"``) gives the new item the lowest number not used under
    its tuple instead. A prefix with no free code left is a :class:`UserError` (nothing is added).
    """
    raw, distances = quantize(index, embeddings)
    extra = index.config.get("resolve") == "extra_level"
    if index.max_len != raw.shape[1] + extra:
        raise UserError(
            f"the {index.method} item index has {index.max_len}-code tuples, its quantizer writes {raw.shape[1]}"
        )
    used: dict[tuple[int, ...], set[int]] = defaultdict(set)  # prefix -> last codes taken under it
    for row in index.codes:
        used[tuple(int(c) for c in row[:-1])].add(int(row[-1]))
    last_size = index.codebook_sizes[-1]
    added = []
    for row, codes in enumerate(raw):
        prefix = tuple(int(c) for c in (codes if extra else codes[:-1]))
        taken = used[prefix]
        if extra:
            free = [c for c in range(last_size) if c not in taken]
            choice = free[0] if free else None
        elif int(codes[-1]) not in taken:
            choice = int(codes[-1])
        else:
            cost = distances[row].astype(np.float64).copy()
            cost[sorted(taken)] = np.inf
            choice = int(cost.argmin()) if np.isfinite(cost).any() else None
        if choice is None:
            raise UserError(
                f"new item {row}: every last-level code under the prefix {list(prefix)} is taken "
                f"({last_size} codes): the index cannot hold another item there without rebuilding it"
            )
        taken.add(choice)
        added.append([*prefix, choice])
    stats = {**index.stats, "items_added": int(index.stats.get("items_added", 0)) + len(added)}
    codes = np.concatenate([index.codes, np.asarray(added, dtype=np.int64).reshape(-1, index.max_len)])
    return dataclasses.replace(index, codes=codes, stats=stats)


def build_with_new_items(
    indexer: Indexer, embeddings: np.ndarray, new: Sequence[int] | np.ndarray
) -> ItemIndex:
    """An index of every row of ``embeddings`` whose quantizer is fit without the rows ``new``: those get
    their codes by :func:`add_items`, in index order, exactly as items added after training would.

    The held-out items of a cold-items split (`recipes/index.py` on such a bundle) must not shape the
    codebooks or the collision resolution either, or a generator evaluated on them would be ranking
    items its index was fit to; this keeps the measurement the one a served bundle's new items get.
    """
    new = np.unique(np.asarray(new, dtype=np.int64))
    old = np.setdiff1d(np.arange(len(embeddings)), new)
    index = indexer.build(IndexData(n_items=len(old), embeddings=embeddings[old]))
    grown = add_items(index, embeddings[new])
    codes = np.empty_like(grown.codes)
    codes[old], codes[new] = grown.codes[: len(old)], grown.codes[len(old) :]
    return dataclasses.replace(grown, codes=codes)
