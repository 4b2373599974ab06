"""The item head as a scorer: prompts with all of a user's training items -> scores of the whole catalogue.

Every scorer in the project (this one, `llmrec.generate.GenerativeScorer`, `llmrec.zeroshot.ZeroShotScorer`,
the `llmrec.baselines`) has one method, ``score(users) -> (batch, n_items)`` (`llmrec.metrics.Scorer`),
so evaluation and serving treat them alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from llmrec.model import CLLM4Rec
from llmrec.prompts import FinetunePrompts, prompt_batch


class ItemHeadScorer:
    """Scores the whole catalogue for users from prompts that hold all their training items.

    One forward pass per user (batched): the hidden state at the prompt's last position goes through the
    item head. Users are processed in the order given; callers exclude seen items themselves.
    """

    def __init__(
        self,
        model: CLLM4Rec,
        prompts: FinetunePrompts,
        histories: Sequence[Sequence[int]],
        batch_size: int = 32,
    ):
        self.model, self.prompts, self.histories, self.batch_size = model, prompts, histories, batch_size
        self.n_items = model.vocab.n_items
        self.device = next(p for p in model.parameters() if p.requires_grad).device

    @torch.no_grad()
    def score(self, users: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(len(users), n_items) logits on the CPU; ``users`` index ``histories``."""
        self.model.eval()
        scores = []
        for start in range(0, len(users), self.batch_size):
            chunk = users[start : start + self.batch_size]
            batch = prompt_batch(
                [self.prompts.encode(int(u), self.histories[int(u)]) for u in chunk],
                pad_token_id=self.model.tokenizer.pad_token_id or 0,
            )
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            scores.append(self.model.score_items(ids, mask).cpu())
        return torch.cat(scores)
