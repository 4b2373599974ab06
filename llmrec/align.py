"""Preference alignment of the item head after supervised finetuning: DPO against the SFT model.

For a prompt built from a chronological prefix of a user's training history, the *chosen* item is the
item that came next and the *rejected* items are those the SFT (reference) model ranks highest among
the items the user never took in training. The policy is the same item head, trained with the DPO loss
(Rafailov et al., 2023) averaged over a prompt's rejected items, as S-DPO does for recommendation:

    L = mean_r -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))])
        + sft_weight * -log pi(c)

where ``log pi(i)`` is the log-softmax of the item head over the whole catalogue at the prompt's last
position. The optional SFT term (RPO, Pang et al., 2024) keeps the chosen item's likelihood from
falling while margins grow.

Why not TRL's ``DPOTrainer``: it takes text ``prompt``/``chosen``/``rejected`` columns, tokenizes them
and scores completions by the token log-probabilities of ``model(...).logits`` over the LM vocabulary.
Here a completion is one catalogue item scored by the item head (the ID tokens live in `RecEmbedding`
tables outside the LM vocabulary), the reference log-probabilities are fixed per example, and training
should run through llmrec's own loop (accelerate, task batches, checkpoints, validation, best model), so
the loss is written here and plugged into `CLLM4Rec.forward` as the ``preference`` task.

The reference model's log-probabilities and the rejected items are computed once, from the SFT model,
before training (offline DPO); a resumed run recomputes them from the same SFT model and gets the same
examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from llmrec.prompts import TASKS, FinetunePrompts, prompt_batch

if TYPE_CHECKING:
    from llmrec.model import CLLM4Rec


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    sft_weight: float = 0.0,
) -> torch.Tensor:
    """Per-row DPO loss: (batch,) log-probs of the chosen item, (batch, n) of the rejected ones.

    Rows average the pairwise loss over their rejected items; ``sft_weight`` adds ``-log pi(chosen)``.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    pairwise = -F.logsigmoid(beta * (chosen_ratio[:, None] - rejected_ratio))
    return pairwise.mean(dim=1) - sft_weight * policy_chosen


class DPOLoss(nn.Module):
    """The ``preference`` task's loss for `CLLM4Rec`: summed `dpo_loss` of a batch and its row count."""

    def __init__(self, beta: float = 0.1, sft_weight: float = 0.0):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"DPO beta must be positive, got {beta}")
        self.beta, self.sft_weight = beta, sft_weight

    def forward(
        self, log_probs: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log_probs``: (batch, n_items) policy log-softmax over the catalogue."""
        chosen = log_probs.gather(1, batch["chosen"][:, None])[:, 0]
        rejected = log_probs.gather(1, batch["rejected"])
        loss = dpo_loss(
            chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], self.beta, self.sft_weight
        )
        return loss.sum(), torch.tensor(loss.shape[0], device=loss.device)


class PreferenceDataset(Dataset):
    """Fixed (prompt, chosen, rejected, reference log-probs) rows for the ``preference`` task."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def task(self, index: int) -> int:
        return TASKS.index("preference")

    def length(self, index: int) -> int:
        return len(self.rows[index]["input_ids"])

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def preference_cuts(histories: Sequence[Sequence[int]], per_user: int) -> list[tuple[int, int]]:
    """(user, t) pairs: the prompt is history[:t] and the chosen item history[t], for the last ``per_user``
    positions of every history with at least two items (the most recent behaviour, nearest to test)."""
    return [
        (user, t)
        for user, items in enumerate(histories)
        for t in range(max(1, len(items) - per_user), len(items))
    ]


@torch.no_grad()
def build_preferences(
    model: CLLM4Rec,
    prompts: FinetunePrompts,
    histories: Sequence[Sequence[int]],
    per_user: int = 1,
    n_rejected: int = 8,
    batch_size: int = 32,
) -> PreferenceDataset:
    """Preference rows from the (reference) ``model``: its log-probs of the chosen item and of its
    ``n_rejected`` best-ranked items outside the user's training history."""
    model.eval()
    device = next(p for p in model.parameters() if p.requires_grad).device
    pad = model.tokenizer.pad_token_id or 0
    rows: list[dict] = []
    cuts = preference_cuts(histories, per_user)
    for start in tqdm(range(0, len(cuts), batch_size), desc="preferences", unit="batch", leave=False):
        chunk = cuts[start : start + batch_size]
        encoded = [prompts.encode(user, histories[user][:t]) for user, t in chunk]
        batch = prompt_batch(encoded, pad)
        scores = model.score_items(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        log_probs = torch.log_softmax(scores.float(), dim=-1).cpu()
        for row, ((user, t), ids) in enumerate(zip(chunk, encoded, strict=True)):
            seen = np.asarray(histories[user], dtype=np.int64)
            ranked = log_probs[row].clone()
            ranked[seen] = -torch.inf
            rejected = ranked.topk(n_rejected).indices
            chosen = int(histories[user][t])
            rows.append(
                {
                    "task": TASKS.index("preference"),
                    "input_ids": ids,
                    "chosen": chosen,
                    "rejected": rejected.tolist(),
                    "ref_chosen": float(log_probs[row, chosen]),
                    "ref_rejected": log_probs[row, rejected].tolist(),
                }
            )
    return PreferenceDataset(rows)
