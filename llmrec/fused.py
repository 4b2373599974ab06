"""The two modes together: the item head's catalogue scores fused with the generator's beam.

Beam search ranks only the items it reaches; the item head scores every item. The fused score is the
head's score plus ``weight`` times the generator's beam log-probability, where an item outside the beam
takes the user's lowest beam score (the search never found it likelier than the last item it kept).
``weight`` 0 is the head alone; a large weight orders the beam's items by the generator and the rest by
the head. The weight is chosen on valid (:func:`choose_fusion_weight`), as the prior's blend weight is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from llmrec.metrics import Scorer
from llmrec.scoring import valid_metric

FUSION_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 1000.0)


def filled_beam_scores(scores: torch.Tensor) -> torch.Tensor:
    """Beam scores (-inf outside each user's list) with every item outside a list at that list's lowest
    score; a user whose list is empty gets zeros (no say in the fusion)."""
    finite = torch.isfinite(scores)
    floor = torch.where(finite, scores, torch.inf).amin(1, keepdim=True)
    floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
    return torch.where(finite, scores, floor)


class FusedScorer:
    """``head.score + weight * filled_beam_scores(generator.score)`` for the same users (`Scorer`)."""

    def __init__(self, head: Scorer, generator: Scorer, weight: float):
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"fusion weight must be finite and >= 0, got {weight}")
        self.head, self.generator, self.weight = head, generator, float(weight)

    def parts(self, users: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(head scores, filled beam scores), each (len(users), n_items), for re-blending at any weight."""
        head = torch.as_tensor(self.head.score(users)).float()
        beam = filled_beam_scores(torch.as_tensor(self.generator.score(users)).float())
        return head, beam

    def score(self, users: Sequence[int] | np.ndarray) -> torch.Tensor:
        head, beam = self.parts(users)
        return head + self.weight * beam


def choose_fusion_weight(
    bundle,
    head: Scorer,
    generator: Scorer,
    weights: Sequence[float] = FUSION_WEIGHTS,
    metric: str = "ndcg@10",
    batch_size: int = 64,
) -> tuple[float, dict[float, float]]:
    """The weight with the best ``metric`` on valid, and the whole grid; ``head`` and ``generator`` must
    score the valid split's input histories. Both are scored once; each weight only re-blends."""
    users, valid = valid_metric(bundle, metric, batch_size)
    head_scores, beam = FusedScorer(head, generator, 0.0).parts(users)
    grid = {float(weight): valid(head_scores + weight * beam) for weight in weights}
    return max(grid, key=grid.get), grid
