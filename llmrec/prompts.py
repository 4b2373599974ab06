"""Prompts as token ids: the task names, the finetune/evaluation prompt of a user, right-padded batches.

The small part of the data path that scoring needs too: training (`llmrec.collate`), evaluation and
the served `llmrec.Recommender` all encode a user's prompt here, so the prompt that is scored is
exactly the one the model was finetuned on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmrec.tokens import RecVocab

IGNORE = -100
# batch["task"] holds an index into this tuple
TASKS = (
    "collaborative",
    "content",
    "finetune",
    "semantic",
    "sequential",
    "preference",
    "semantic_sequence",
    "semantic_title",
    "semantic_preference",  # alignment of the semantic-ID generator (llmrec.generator_align)
)


@dataclass
class FinetunePrompts:
    """Renders finetuning/evaluation prompts from a user's history with the bundle's template."""

    vocab: RecVocab
    tokenizer: object
    template: str  # e.g. "<user_{user}> has interacted with {history}, <user_{user}> will interact with"
    max_tokens: int = 512

    def encode(self, user: int, items: Sequence[int]) -> list[int]:
        """Prompt ids for ``user`` with ``items`` as history; the oldest items are dropped to fit ``max_tokens``."""
        return self.vocab.encode(self.render(user, self.kept(user, items)), self.tokenizer)

    def encode_parts(self, user: int, items: Sequence[int]) -> tuple[list[int], int]:
        """The ids of :meth:`encode` and ``end``: ``ids[:end]`` is the prompt up to its last history item.

        Appending items to the history changes only what follows ``end`` (unless truncation drops old
        items), which lets `llmrec.scoring.UserStates` keep the keys and values of ``ids[:end]``. Where the
        template has no ``{history}``, or the text before it does not encode as the prompt's start,
        ``end`` is ``len(ids)``.
        """
        kept = self.kept(user, items)
        ids = self.vocab.encode(self.render(user, kept), self.tokenizer)
        before, found, _ = self.template.partition("{history}")
        if not found:
            return ids, len(ids)
        head = self.vocab.encode(self.render(user, kept, before + found), self.tokenizer)
        return ids, len(head) if ids[: len(head)] == head else len(ids)

    def kept(self, user: int, items: Sequence[int]) -> list[int]:
        """The newest ``items`` that fit ``max_tokens`` beside the template's own tokens (at least one)."""
        items = list(items)
        if not items:
            return items
        budget = self.max_tokens - len(self.vocab.encode(self.render(user, []), self.tokenizer))
        used = np.cumsum([self.item_width(i) for i in reversed(items)])
        return items[len(items) - max(1, int(np.searchsorted(used, budget, side="right"))) :]

    def item_width(self, item: int) -> int:
        """Tokens one history item takes in the prompt."""
        return 1

    def item_text(self, item: int) -> str:
        """How one history item is written in the prompt: its item token."""
        return self.vocab.placeholder(self.vocab.item_token(item))

    def render(self, user: int, items: Sequence[int], template: str | None = None) -> str:
        history = " ".join(self.item_text(i) for i in items)
        # no trailing space: an empty history must give the same tokens as the start of a longer one
        return (template or self.template).format(user=user, history=history).rstrip()


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def prompt_batch(rows: Sequence[Sequence[int]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids`` right-padded with ``pad_token_id`` and their ``attention_mask``."""
    return {"input_ids": pad(rows, pad_token_id), "attention_mask": pad([[1] * len(row) for row in rows], 0)}
