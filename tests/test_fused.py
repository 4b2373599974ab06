"""The item head fused with the generator's beam (`llmrec.fused`), on hand-made scores."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from llmrec.fused import FusedScorer, choose_fusion_weight, filled_beam_scores
from llmrec.scoring import PrecomputedScorer

INF = float("inf")


def test_items_outside_the_beam_take_the_lowest_beam_score():
    scores = torch.tensor([[-1.0, -INF, -3.0, -INF], [-INF, -INF, -INF, -INF]])
    filled = filled_beam_scores(scores)
    assert filled.tolist() == [[-1.0, -3.0, -3.0, -3.0], [0.0, 0.0, 0.0, 0.0]]


def test_weight_zero_is_the_head_and_a_large_weight_puts_the_beam_first():
    users = np.arange(1)
    head = PrecomputedScorer(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), users)
    beam = PrecomputedScorer(torch.tensor([[-INF, -INF, -0.5, -2.0]]), users)
    torch.testing.assert_close(FusedScorer(head, beam, 0.0).score(users), head.score(users))
    order = FusedScorer(head, beam, 1000.0).score(users).argsort(descending=True)[0].tolist()
    assert order == [2, 0, 1, 3]  # beam order first (2 over 3), the rest by the head (0, 1); 3 = floor
    with pytest.raises(ValueError, match="fusion weight"):
        FusedScorer(head, beam, -1.0)


class _Bundle:
    """Two users, four items, one valid item each (leave-one-out)."""

    n_users, n_items = 2, 4

    def matrix(self, split: str) -> sp.csr_matrix:
        rows = {"valid": [3, 2], "test": [1, 1], "train": [0, 0]}[split]
        return sp.csr_matrix((np.ones(2), (np.arange(2), rows)), shape=(2, 4))

    def seen(self, split: str) -> sp.csr_matrix:
        return self.matrix("train")


def test_the_weight_is_chosen_on_valid():
    users = np.arange(2)
    # the head ranks the valid items last; the beam finds them: only a large weight puts them first
    head = PrecomputedScorer(torch.tensor([[9.0, 3.0, 2.0, 1.0], [9.0, 3.0, 1.0, 2.0]]), users)
    beam = PrecomputedScorer(torch.tensor([[-INF, -2.0, -INF, -0.1], [-INF, -2.0, -0.1, -INF]]), users)
    best, grid = choose_fusion_weight(_Bundle(), head, beam, weights=(0.0, 1000.0), metric="ndcg@5")
    assert best == 1000.0 and grid[1000.0] == pytest.approx(1.0) and grid[0.0] < 1.0
