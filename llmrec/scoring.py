"""The item head as a scorer: prompts with all of a user's training items -> scores of the whole catalogue.

Every scorer in the project (this one, `llmrec.generate.GenerativeScorer`, `llmrec.zeroshot.ZeroShotScorer`,
the `llmrec.baselines`) has one method, ``score(users) -> (batch, n_items)`` (`llmrec.metrics.Scorer`),
so evaluation and serving treat them alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from llmrec.model import CLLM4Rec
from llmrec.prompts import FinetunePrompts, pad, prompt_batch


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

    def batches(self, users: Sequence[int] | np.ndarray) -> Iterator[tuple[torch.Tensor, ...]]:
        """(input_ids, attention_mask, history) of the users' prompts, ``batch_size`` users at a time;
        ``history`` holds every history item (padded with -1), also those a long prompt leaves out."""
        for start in range(0, len(users), self.batch_size):
            chunk = [int(u) for u in users[start : start + self.batch_size]]
            batch = prompt_batch(
                [self.prompts.encode(u, self.histories[u]) for u in chunk],
                pad_token_id=self.model.tokenizer.pad_token_id or 0,
            )
            history = pad([list(self.histories[u]) for u in chunk], -1)
            yield (
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                history.to(self.device),
            )

    @torch.no_grad()
    def score(self, users: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(len(users), n_items) scores on the CPU; ``users`` index ``histories``."""
        self.model.eval()
        return torch.cat([self.model.score_items(*batch).cpu() for batch in self.batches(users)])

    @torch.no_grad()
    def parts(self, users: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM logits, prior scores) of the users, unblended (see `CLLM4Rec.score_parts`)."""
        self.model.eval()
        pairs = [tuple(t.cpu() for t in self.model.score_parts(*batch)) for batch in self.batches(users)]
        return torch.cat([lm for lm, _ in pairs]), torch.cat([prior for _, prior in pairs])


class PrecomputedScorer:
    """Scores computed once for a set of users (e.g. a blend of two scorers' outputs), served by user."""

    def __init__(self, scores: torch.Tensor, users: Sequence[int] | np.ndarray):
        self.scores, self.n_items = scores, scores.shape[1]
        self.row = {int(user): row for row, user in enumerate(users)}

    def score(self, users: Sequence[int] | np.ndarray) -> torch.Tensor:
        return self.scores[[self.row[int(u)] for u in users]]
