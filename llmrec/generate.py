"""Generative recommendation with semantic IDs: training the LM to write an item's code tuple.

Training (task ``semantic``, :class:`SemanticDataset`): the prompt is the finetuning template over a
masked share of the user's training history, the main text is the semantic ID of one held-out item,
``<s0_a> <s1_b> <s2_c>``. Each code is scored by a softmax over its own level's codebook only, through
the collaborative semantic table (tied, as CLLM4Rec ties the item tokens); see
`CLLM4Rec.semantic_loss`. ``semantic_next`` (:class:`NextSemanticDataset`) and ``semantic_sequence``
(:class:`SemanticSequenceDataset`) are the next-item versions.

Decoding lives in `llmrec.decoding` (the serving layer, so that an exported generator bundle ranks with
the same code as evaluation): the prompt builder, the trie as tensors, the constrained beam search and
:class:`GenerativeScorer`, re-exported here. :func:`generate_reference` runs ``transformers``'
``generate`` over the same trie, the reference the batched search is checked and timed against.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from llmrec.collate import FinetuneDataset, SequenceDataset, epoch_rng, lm_example
from llmrec.decoding import (
    GenerativeScorer,
    ModelDecoder,
    SemanticDecoder,
    SemanticPrompts,
    TrieTensors,
    constrained_beam_search,
    index_validity,
    require_index,
    require_index_of,
    unconstrained_beam_search,
)
from llmrec.model import CLLM4Rec
from llmrec.prompts import IGNORE, TASKS, FinetunePrompts

if TYPE_CHECKING:
    from llmrec.indexing.base import ItemIndex

__all__ = [
    "GenerativeScorer",
    "ModelDecoder",
    "NextSemanticDataset",
    "SemanticDataset",
    "SemanticDecoder",
    "SemanticPrompts",
    "SemanticSequenceDataset",
    "TrieTensors",
    "constrained_beam_search",
    "generate_reference",
    "index_validity",
    "require_index",
    "require_index_of",
    "unconstrained_beam_search",
]

logger = logging.getLogger(__name__)


class SemanticDataset(FinetuneDataset):
    """One example per user and epoch: a masked-history prompt, then the semantic ID of one held-out item.

    The prompt/held-out split is `FinetuneDataset.split` (re-drawn every epoch from ``(seed, epoch,
    row)``); the target is the first held-out item of that epoch's permutation, a uniform draw among the
    held-out items that needs no further randomness. A user with a single training item gets an empty
    history and that item as target.
    """

    def __init__(
        self,
        histories: Sequence[Sequence[int]],
        prompts: FinetunePrompts,
        index: ItemIndex,
        seed: int = 0,
        mask_ratio: float = 0.2,
    ):
        super().__init__(histories, prompts, seed=seed, mask_ratio=mask_ratio)
        self.item_tokens = index.token_ids(prompts.vocab)  # (n_items, max_len), -1 = padding
        self.first_semantic = prompts.vocab.family_range("semantic").start

    def task(self, index: int) -> int:
        return TASKS.index("semantic")

    def length(self, index: int) -> int:
        return super().length(index) + self.item_tokens.shape[1]

    def __getitem__(self, index: int) -> dict:
        kept, heldout = self.split(index)
        if len(heldout) == 0:
            kept, heldout = kept[:0], kept
        tokens = [int(t) for t in self.item_tokens[heldout[0]] if t >= 0]
        input_ids, labels = lm_example(
            self.prompts.encode(self.users[index], kept), tokens, [t - self.first_semantic for t in tokens]
        )
        return {"task": TASKS.index("semantic"), "input_ids": input_ids, "labels": labels}


class NextSemanticDataset(SemanticDataset):
    """The semantic-ID task in the next-item setting: the prompt is a chronological prefix of the history
    and the target the semantic ID of the item right after it.

    One prefix per user and epoch, its length drawn uniformly from ``(seed, epoch, row)`` (every prefix
    would be one LM forward each: the codes of the next item follow the prompt, so prefixes cannot share a
    forward as the item head's do).
    """

    def split(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        items = self.histories[index]
        cut = int(epoch_rng(self.seed, self.epoch, index).integers(0, len(items)))
        return items[:cut], items[cut : cut + 1]


class SemanticSequenceDataset(SequenceDataset):
    """Every-position semantic-ID training: one causal forward per history window (`SequenceDataset`,
    over :class:`SemanticPrompts`) trains the codes of every item of the window at once.

    Each position whose next token is a semantic code is labelled with that code's row of the semantic
    table (a per-level softmax, `CLLM4Rec.semantic_loss`); item tokens and the template's words carry no
    loss. The history's first item is predicted from the template alone, as the item head's is. 943
    prefixes per epoch become every training interaction (~99k on ML-100K).

    With ``item_targets`` each example also carries ``item_labels``: the next item's catalogue index at
    the position that writes its first code (the position the item head's sequential task trains), for
    the auxiliary item softmax of `CLLM4Rec.semantic_loss` (``model.item_loss_weight``).
    """

    def __init__(
        self,
        histories: Sequence[Sequence[int]],
        prompts: SemanticPrompts,
        windows: bool = True,
        item_targets: bool = False,
    ):
        super().__init__(histories, prompts, windows=windows)
        self.semantic = prompts.vocab.family_range("semantic")
        self.item_targets = item_targets

    def task(self, index: int) -> int:
        return TASKS.index("semantic_sequence")

    def length(self, index: int) -> int:
        return min(sum(map(self.prompts.item_width, self.histories[index])), self.prompts.max_tokens)

    def __getitem__(self, index: int) -> dict:
        user, history = self.users[index], self.histories[index]
        input_ids, end = self.prompts.encode_parts(user, history)
        start = self.semantic.start
        labels = [t - start if t in self.semantic else IGNORE for t in input_ids[1:]] + [IGNORE]
        example = {"task": TASKS.index("semantic_sequence"), "input_ids": input_ids, "labels": labels}
        if self.item_targets:
            kept = self.prompts.kept(user, history)
            widths = [self.prompts.item_width(item) for item in kept]
            first = end - sum(widths) + np.cumsum([0, *widths[:-1]])  # where each item's codes begin
            if first[0] < 1 or any(
                input_ids[f] != self.prompts.codes[i][0] for f, i in zip(first, kept, strict=True)
            ):
                raise ValueError(f"example {index}: the prompt's template does not end with its history")
            item_labels = [IGNORE] * len(input_ids)
            for position, item in zip(first - 1, kept, strict=True):
                item_labels[position] = item
            example["item_labels"] = item_labels
        return example


class _LevelLogProbs(torch.nn.Module):
    """An LM head over the whole vocabulary for ``transformers``' ``generate``: each semantic level's block
    holds that level's own log-softmax, every other token -inf. ``generate`` log-softmaxes it again over
    the whole vocabulary, which subtracts log(levels) from every entry, the same at every step, so
    beam order and the lists are those of the per-level scores `constrained_beam_search` uses."""

    def __init__(self, model: CLLM4Rec):
        super().__init__()
        self.model = model

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        vocab = self.model.vocab
        out = hidden.new_full((*hidden.shape[:-1], vocab.total_size), float("-inf"), dtype=torch.float32)
        for level, size in enumerate(vocab.semantic_codebooks):
            start = vocab.level_range(level).start
            out[..., start : start + size] = F.log_softmax(
                self.model.semantic_logits(hidden, level).float(), -1
            )
        return out


@torch.no_grad()
def generate_reference(
    model: CLLM4Rec,
    prompts: Sequence[Sequence[int]],
    beam: int,
    excluded: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``beam`` items per prompt from ``transformers``' ``generate(num_beams=beam,
    prefix_allowed_tokens_fn=...)``, with the trie (and ``excluded`` items) in the callback: the
    reference that `constrained_beam_search` is checked and timed against (``benchmarks/beam_speed.py``).

    The LM's input embeddings and head are swapped for the collaborative ID table and
    :class:`_LevelLogProbs` during the call. Scores are put back on the per-level scale. Fixed-length,
    prefix-free indexes only (``generate`` ends every beam after ``max_new_tokens``).
    """
    index = require_index(model)
    if index.lengths().min() != index.max_len:
        raise ValueError("generate_reference needs an index whose code tuples all have the same length")
    trie, vocab = index.trie(), model.vocab
    device = next(p for p in model.parameters() if p.requires_grad).device
    tensors = TrieTensors(index)
    remaining = tensors.remaining(excluded or [[]] * len(prompts)).numpy()
    starts = [vocab.level_range(tensors.level(depth)).start for depth in range(index.max_len)]
    width = max(len(p) for p in prompts)

    def allowed(row: int, input_ids: torch.Tensor) -> list[int]:
        generated = input_ids[width:].tolist()
        node = trie.node([t - starts[depth] for depth, t in enumerate(generated)])
        children = trie.child_nodes[trie.child_ptr[node] : trie.child_ptr[node + 1]]
        children = children[remaining[row, children] > 0]
        return (trie.token[children] + starts[len(generated)]).tolist()

    pad = model.tokenizer.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    causal = model.lm.get_base_model()
    embeddings, head = causal.get_input_embeddings(), causal.get_output_embeddings()
    causal.set_input_embeddings(model.collab)
    causal.set_output_embeddings(_LevelLogProbs(model))
    try:
        with model._adapter("collab"):
            out = causal.generate(
                input_ids=input_ids,
                attention_mask=mask,
                num_beams=beam,
                num_return_sequences=beam,
                max_new_tokens=index.max_len,
                min_new_tokens=index.max_len,
                do_sample=False,
                length_penalty=0.0,
                early_stopping=True,
                prefix_allowed_tokens_fn=allowed,
                return_dict_in_generate=True,
                output_scores=True,
                pad_token_id=pad,
                eos_token_id=None,
            )
    finally:
        causal.set_input_embeddings(embeddings)
        causal.set_output_embeddings(head)
    codes = (out.sequences[:, width:] - torch.tensor(starts, device=device)).view(len(prompts), beam, -1)
    items = torch.tensor([[trie.item(row) for row in user.tolist()] for user in codes])
    scores = out.sequences_scores.view(len(prompts), beam).cpu().float()
    return items, scores + index.max_len * math.log(len(vocab.semantic_codebooks))
