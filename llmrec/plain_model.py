"""The plain model format: a transformers model + tokenizer in which the ID tokens are ordinary added tokens.

For users who want ``AutoModelForCausalLM``/``AutoTokenizer`` only: :func:`export_plain_model` writes it
(through `common.artifacts`), transformers reads it (with ``rec_vocab.json``, `llmrec.tokens.RecVocab`,
beside). An export bundle's ``merged/`` is one (`llmrec.bundle`, ``--merge``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from common.artifacts import Kind, write_directory
from llmrec.tokens import VOCAB_FILE, RecEmbedding, RecVocab

PLAIN_MODEL = Kind("plain model with ID tokens", VOCAB_FILE)


def export_plain_model(
    model: Any,
    tokenizer: Any,
    vocab: RecVocab,
    rec_embedding: RecEmbedding,
    out_dir: str | Path,
) -> Path:
    """Write a plain HF model + tokenizer in which the ID tokens are ordinary added tokens.

    For users who want ``AutoModelForCausalLM``/``AutoTokenizer`` only. ``model`` must be a plain
    transformers model (merge LoRA first, e.g. ``peft_model.merge_and_unload()``); it is resized
    in place to ``vocab.total_size`` rows and the new rows get the trained embeddings. If the
    output embeddings are not tied to the input ones, their new rows get the same vectors (tied
    initialisation). The tokenizer is copied and gets the placeholders as added tokens with the
    ids of ``vocab`` (``lstrip=True``, matching :meth:`RecVocab.encode`); when the embedding
    table is larger than ``len(tokenizer)`` the gap is filled with reserved tokens so ids line up.
    Tokenizing through 100k+ added tokens is slow; the training path never does it.
    """
    from transformers import AddedToken

    out_dir = Path(out_dir)
    if len(tokenizer) > vocab.base_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab.base_size={vocab.base_size}")
    tokenizer = _copy_tokenizer(tokenizer)
    reserved = [f"<|llmrec_reserved_{k}|>" for k in range(vocab.base_size - len(tokenizer))]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in reserved])
    tokenizer.add_tokens([AddedToken(p, lstrip=True, normalized=False) for p in vocab.placeholders()])
    if len(tokenizer) != vocab.total_size:
        raise ValueError(
            f"tokenizer ended with {len(tokenizer)} tokens, expected {vocab.total_size} "
            "(some placeholders already existed in it?)"
        )
    new_rows = torch.cat([rec_embedding.family_rows(name) for name in rec_embedding.tables])
    model.resize_token_embeddings(vocab.total_size, mean_resizing=False)
    with torch.no_grad():
        inp = model.get_input_embeddings().weight
        inp[vocab.base_size :] = new_rows.to(inp)
        outp = model.get_output_embeddings()
        if outp is not None and outp.weight.data_ptr() != inp.data_ptr():
            outp.weight[vocab.base_size :] = new_rows.to(outp.weight)
    with write_directory(out_dir, PLAIN_MODEL, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        vocab.save_pretrained(tmp)
    return out_dir


def _copy_tokenizer(tokenizer: Any) -> Any:
    """An independent copy (save + reload) so the caller's tokenizer keeps its fast path."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp)
