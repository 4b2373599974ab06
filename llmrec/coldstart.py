"""Items nobody has interacted with in a cold-items dataset bundle: give them ID-token rows without
retraining. Two ways (``benchmarks/cold_start_ml100k.py`` measures both):

- **mapper** (`llmrec.mapper.TextToID`, the default): a ridge map from the item's text embedding to the
  rows of the warm items.
- **fold-in** (:func:`fold_in`): fit only the new items' content embeddings on their text with the
  content LM (everything else frozen, a few Adam steps), then carry them to the collaborative side
  through the collaborative <-> content relation learned on warm items (a ridge map from content rows
  to the other rows; the mutual regulariser is what makes the two views related at all).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from data_prep import Bundle
from data_prep.cold import cold_ids
from llmrec.collate import PretrainDataset, collate
from llmrec.mapper import Ridge, TextToID, item_rows, item_texts, set_item_rows
from llmrec.model import CLLM4Rec

logger = logging.getLogger(__name__)

COLD_METHODS = ("mapper", "fold-in")


def warm_items(train: sp.spmatrix, n_items: int) -> np.ndarray:
    """Items with at least one training interaction (``train``: a (users, items) sparse matrix)."""
    counts = np.asarray(train.sum(axis=0)).ravel()
    return np.flatnonzero(counts[:n_items] > 0)


# ---------------------------------------------------------------------------------- fold-in
def fold_in(
    model: CLLM4Rec,
    items: Sequence[int] | np.ndarray,
    texts: Sequence[str],
    template: str,
    *,
    steps: int = 20,
    lr: float = 1e-2,
    batch_size: int = 64,
) -> torch.Tensor:
    """Fit the content embeddings of ``items`` on their ``texts`` (content LM loss on
    ``template.format(item=i)`` + text), every other weight frozen; returns the fitted rows.

    ``steps`` Adam steps per batch of items, starting from the rows the model holds (set them first,
    e.g. with the mapper, to start from a prediction). Dropout is off, so the result is deterministic.
    """
    items = np.asarray(items, dtype=np.int64)
    if len(items) != len(texts):
        raise ValueError(f"{len(items)} items but {len(texts)} texts")
    table = model.content.family_weight("item")
    rows = [
        {"kind": "item", "prompt": template.format(item=int(i)), "main": t}
        for i, t in zip(items, texts, strict=True)
    ]
    data = PretrainDataset(rows, model.vocab, model.tokenizer, max_tokens=model.config.max_doc_tokens)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for start in range(0, len(items), batch_size):
            chunk = torch.as_tensor(items[start : start + batch_size], device=table.device)
            fitted = nn.Parameter(table[chunk].detach().clone())
            optimizer = torch.optim.Adam([fitted], lr=lr)
            batch = collate(
                [data[n] for n in range(start, start + len(chunk))], model.tokenizer.pad_token_id or 0
            )
            batch = {k: v.to(table.device) for k, v in batch.items()}
            for _ in range(steps):
                with torch.no_grad():
                    table[chunk] = fitted
                table.requires_grad_(True)  # the rows enter the LM through the table: take its gradient
                loss_sum, count = model.content_loss(batch)
                fitted.grad = torch.autograd.grad(loss_sum / count.clamp(min=1), table)[0][chunk]
                table.requires_grad_(False)
                optimizer.step()
            with torch.no_grad():
                table[chunk] = fitted
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return table[torch.as_tensor(items, device=table.device)].detach().clone()


def fold_in_items(
    model: CLLM4Rec,
    items: Sequence[int] | np.ndarray,
    texts: Sequence[str],
    template: str,
    warm: Sequence[int] | np.ndarray,
    relation: str = "linear",
    **fold_in_kwargs,
) -> None:
    """:func:`fold_in` the content rows of ``items``, then :func:`relate` them to every other row."""
    relate(model, items, fold_in(model, items, texts, template, **fold_in_kwargs), warm, relation)


def relate(
    model: CLLM4Rec,
    items: Sequence[int] | np.ndarray,
    content: torch.Tensor,
    warm: Sequence[int] | np.ndarray,
    relation: str = "linear",
) -> None:
    """Give ``items`` the content rows ``content`` and every other row through the collaborative <->
    content relation of the ``warm`` items: ``"linear"`` (a ridge map from content rows to the other
    rows) or ``"identity"`` (the other embeddings equal the content one, as the mutual regulariser asks;
    an untied head's bias is the warm items' mean)."""
    if relation not in ("linear", "identity"):
        raise ValueError(f"relation must be 'linear' or 'identity', got {relation!r}")
    warm = np.asarray(warm, dtype=np.int64)
    hidden = model.content.family_weight("item").shape[1]
    known = item_rows(model)[warm].cpu()
    content = content.float().cpu()
    if relation == "linear":
        rows = Ridge.fit(known[:, hidden : 2 * hidden], known)(content)
    else:
        own = model.head.rows_like(content, known[:, 2 * hidden :])
        rows = torch.cat([content, content, own], dim=1)
    rows[:, hidden : 2 * hidden] = content
    set_item_rows(model, items, rows)


# ---------------------------------------------------------------------------------- a cold-items bundle
def cold_start(
    model: CLLM4Rec,
    bundle: Bundle,
    method: str = "mapper",
    *,
    items: Sequence[int] | np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    encoder: str = "minilm",
    relation: str = "linear",
    **fold_in_kwargs,
) -> None:
    """Give a model trained on ``bundle``'s training split rows for its unseen ``items`` (default: the cold
    items in the manifest) by ``method``: ``"mapper"``, ``"fold-in"``, or ``"mapper+fold-in"`` (fold-in
    starting from the mapper's rows). ``embeddings``: the items' text embeddings, if already computed."""
    if method not in (*COLD_METHODS, "mapper+fold-in"):
        raise ValueError(f"unknown cold-start method {method!r}: expected mapper, fold-in or mapper+fold-in")
    items = cold_ids(bundle.manifest, "items") if items is None else np.asarray(items, dtype=np.int64)
    if not len(items):
        raise ValueError(f"{bundle.path}: no cold items to score (not a cold-items split)")
    warm = warm_items(bundle.matrix("train"), bundle.n_items)
    texts = item_texts(bundle.item_titles, bundle.item_text)
    if method.startswith("mapper"):
        if embeddings is None:
            from llmrec.indexing.encoders import item_embeddings

            embeddings = item_embeddings(texts, encoder)
        TextToID.fit(model, embeddings, warm, encoder).apply(model, items, embeddings[items])
    if method.endswith("fold-in"):
        new_texts = [texts[i] for i in items]
        fold_in_items(model, items, new_texts, bundle.templates.item, warm, relation, **fold_in_kwargs)
