"""Prompts as token ids: the task names, the finetune/evaluation prompt of a user, right-padded batches.

The small part of the data path that scoring needs too: training (`llmrec.collate`), evaluation and
the served `llmrec.Recommender` all encode a user's prompt here, so the prompt that is scored is
exactly the one the model was finetuned on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmrec.tokens import RecVocab

IGNORE = -100
# batch["task"] holds an index into this tuple
TASKS = ("collaborative", "content", "finetune", "semantic", "sequential", "preference")


@dataclass
class FinetunePrompts:
    """Renders finetuning/evaluation prompts from a user's history with the bundle's template."""

    vocab: RecVocab
    tokenizer: object
    template: str  # e.g. "<user_{user}> has interacted with {history}, <user_{user}> will interact with"
    max_tokens: int = 512

    def encode(self, user: int, items: Sequence[int]) -> list[int]:
        """Prompt ids for ``user`` with ``items`` as history; the oldest items are dropped to fit ``max_tokens``."""
        fixed = len(self.vocab.encode(self.render(user, []), self.tokenizer))
        keep = max(1, self.max_tokens - fixed)
        return self.vocab.encode(self.render(user, list(items)[-keep:]), self.tokenizer)

    def render(self, user: int, items: Sequence[int]) -> str:
        history = " ".join(self.vocab.placeholder(self.vocab.item_token(i)) for i in items)
        # no trailing space: an empty history must give the same tokens as the start of a longer one
        return self.template.format(user=user, history=history).rstrip()


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def prompt_batch(rows: Sequence[Sequence[int]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids`` right-padded with ``pad_token_id`` and their ``attention_mask``."""
    return {"input_ids": pad(rows, pad_token_id), "attention_mask": pad([[1] * len(row) for row in rows], 0)}
