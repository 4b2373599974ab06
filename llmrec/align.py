"""Preference alignment of the item head after supervised finetuning: DPO and S-DPO against the SFT model.

For a prompt built from a chronological prefix of a user's training history, the *chosen* item is the
item that came next and the *rejected* items are those the SFT (reference) model ranks highest among
the items the user never took in training, plus (``n_random``) items drawn uniformly from the rest of
the unseen catalogue, so the loss also sees ordinary negatives and not only the hardest. With the ratio
``m(i) = log pi(i) - log ref(i)``, the policy is trained with either

    pairwise DPO (Rafailov et al., 2023), averaged over the rejected items:
        L = mean_r -log sigmoid(beta * [m(c) - m(r)])
    or S-DPO (softmax DPO, Chen et al., 2024), one term over all rejected items at once:
        L = -log sigmoid(-log sum_r exp(beta * [m(r) - m(c)]))

plus ``sft_weight * -log pi(c)``, where ``log pi(i)`` is the log-softmax of the item head's logits
over the whole catalogue at the prompt's last position (the distribution SFT fitted; a prior, if the
run has one, is blended after, as in evaluation). With one rejected item both losses are the same;
with many, S-DPO's gradient concentrates on the rejected items the policy over-rates instead of pushing
every pair equally, which is what lowered the chosen item's likelihood under pairwise DPO. The optional
SFT term (RPO, Pang et al., 2024) keeps the chosen item's likelihood from falling while margins grow.

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

from collections.abc import Iterator, Sequence
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


def sdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    sft_weight: float = 0.0,
) -> torch.Tensor:
    """Per-row S-DPO loss, shapes as `dpo_loss`: ``softplus(logsumexp_r beta * (m(r) - m(c)))``, which is
    ``-log sigmoid(-log sum_r exp(...))`` written so that it stays finite for large margins."""
    margins = beta * ((policy_rejected - ref_rejected) - (policy_chosen - ref_chosen)[:, None])
    return F.softplus(torch.logsumexp(margins, dim=1)) - sft_weight * policy_chosen


PREFERENCE_LOSSES = {"dpo": dpo_loss, "sdpo": sdpo_loss}


class DPOLoss(nn.Module):
    """The ``preference`` task's loss for `CLLM4Rec`: the summed pairwise DPO (``loss="dpo"``) or S-DPO
    (``loss="sdpo"``) loss of a batch and its row count."""

    def __init__(self, beta: float = 0.1, sft_weight: float = 0.0, loss: str = "dpo"):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"DPO beta must be positive, got {beta}")
        if loss not in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss must be one of {sorted(PREFERENCE_LOSSES)}, got {loss!r}")
        self.beta, self.sft_weight, self.loss = beta, sft_weight, PREFERENCE_LOSSES[loss]

    def forward(
        self, log_probs: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log_probs``: (batch, n_items) policy log-softmax over the catalogue."""
        chosen = log_probs.gather(1, batch["chosen"][:, None])[:, 0]
        rejected = log_probs.gather(1, batch["rejected"])
        loss = self.loss(
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
    n_random: int = 0,
    seed: int = 0,
) -> PreferenceDataset:
    """Preference rows from the (reference) ``model``: its log-probs of the chosen item, of its
    ``n_rejected`` best-ranked items outside the user's training history and of ``n_random`` other such
    items drawn uniformly (seeded by ``seed``)."""
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for (user, t), ids, log_probs in reference_log_probs(model, prompts, histories, per_user, batch_size):
        seen = np.asarray(histories[user], dtype=np.int64)
        ranked = log_probs.clone()
        ranked[seen] = -torch.inf
        rejected = ranked.topk(n_rejected).indices
        if n_random:
            ranked[rejected] = -torch.inf
            rest = torch.isfinite(ranked).nonzero()[:, 0].numpy()
            drawn = rng.choice(rest, size=min(n_random, len(rest)), replace=False)
            rejected = torch.cat([rejected, torch.from_numpy(np.sort(drawn))])
        chosen = int(histories[user][t])
        rows.append(
            {
                "task": TASKS.index("preference"),
                "input_ids": ids,
                "chosen": chosen,
                "rejected": rejected.tolist(),
                "ref_chosen": float(log_probs[chosen]),
                "ref_rejected": log_probs[rejected].tolist(),
            }
        )
    return PreferenceDataset(rows)


@torch.no_grad()
def reference_log_probs(
    model: CLLM4Rec,
    prompts: FinetunePrompts,
    histories: Sequence[Sequence[int]],
    per_user: int,
    batch_size: int,
) -> Iterator[tuple[tuple[int, int], list[int], torch.Tensor]]:
    """For every `preference_cuts` cut: ``((user, t), prompt ids, (n_items,) log-softmax of the model's
    item head)``, the reference distribution that alignment (DPO, S-DPO, GRPO) measures the policy against."""
    model.eval()
    device = next(p for p in model.parameters() if p.requires_grad).device
    pad = model.tokenizer.pad_token_id or 0
    cuts = preference_cuts(histories, per_user)
    for start in tqdm(range(0, len(cuts), batch_size), desc="reference", unit="batch", leave=False):
        chunk = cuts[start : start + batch_size]
        encoded = [prompts.encode(user, histories[user][:t]) for user, t in chunk]
        batch = prompt_batch(encoded, pad)
        log_probs = model.item_log_probs(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        yield from zip(chunk, encoded, log_probs.cpu(), strict=True)
