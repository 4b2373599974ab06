"""GRPO (group relative policy optimisation, Shao et al. 2024) for the item head, with ranking rewards.

A rollout is a ranked list of items; a prompt's group is several rollouts; each rollout's reward counts
the held-out item's hit and its rank (``1 / log2(rank + 1)``, the gain of NDCG) minus a penalty per
invalid, repeated or already-seen item; its advantage is its reward normalised within the group. The
reward and advantage functions take plain lists of candidate item lists, so beam outputs of the
semantic-ID generator can be scored by the same code as the item head's samples.

For the item head the policy is the head's softmax over the unseen catalogue (seen items masked), and a
rollout of length ``K`` is ``K`` items drawn without replacement in order (Gumbel top-k), whose
probability is Plackett-Luce's: ``log P(list) = sum_k log pi(i_k) - log(1 - sum_{j<k} pi(i_j))``. The
loss of a prompt is

    L = -mean_g A_g * log P(list_g) / K + kl_weight * KL(pi || ref)

with the KL to the SFT (reference) model exact over the unseen catalogue, not sampled. Rollouts are drawn
from the current policy at every step and used for one gradient step, so the PPO ratio is 1 and its clip
is inactive: the update is GRPO's on-policy gradient.

Why not TRL's ``GRPOTrainer``: its policy generates text completions token by token from
``model.generate`` and its rewards read the decoded text; here an action is a list of catalogue items
scored by the item head (the ID tokens live in `RecEmbedding` tables outside the LM vocabulary) from a
single forward per prompt, the reference is fixed per prompt (its log-probs are computed once, as DPO's),
and training runs through llmrec's own loop (accelerate, task batches, checkpoints, validation, best
model), so the loss plugs into `CLLM4Rec.forward` as the ``preference`` task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from llmrec.align import PreferenceDataset, reference_log_probs
from llmrec.prompts import TASKS, FinetunePrompts

if TYPE_CHECKING:
    from llmrec.model import CLLM4Rec


def rollout_rewards(
    rollouts: Sequence[Sequence[int]],
    target: int,
    seen: Sequence[int] = (),
    n_items: int | None = None,
    penalty: float = 0.0,
) -> np.ndarray:
    """(len(rollouts),) rewards: ``1 / log2(rank + 1)`` where ``target`` is at 1-based ``rank`` in the list
    (0 if absent), minus ``penalty`` per item that is invalid (negative or ``>= n_items``), repeated in its
    list, or in ``seen``."""
    seen_set = set(int(item) for item in seen)
    rewards = np.zeros(len(rollouts))
    for g, items in enumerate(rollouts):
        counted: set[int] = set()
        for rank, item in enumerate((int(i) for i in items), start=1):
            invalid = item < 0 or (n_items is not None and item >= n_items)
            if invalid or item in counted or item in seen_set:
                rewards[g] -= penalty
            elif item == target:
                rewards[g] += 1.0 / math.log2(rank + 1)
            counted.add(item)
    return rewards


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantages of (..., group) rewards: each reward minus its group's mean, over the group's
    standard deviation; 0 for a group whose rewards are all equal (it carries no preference)."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=False)
    return torch.where(std > eps, centred / std.clamp(min=eps), torch.zeros_like(centred))


def sample_lists(
    log_probs: torch.Tensor, group: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    """(batch, group, length) item lists drawn without replacement from each row's distribution
    ``log_probs`` (batch, n_items; ``-inf`` items are never drawn): Gumbel top-k, i.e. Plackett-Luce."""
    u = torch.rand((*log_probs.shape[:1], group, log_probs.shape[1]), generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    return (log_probs.detach()[:, None, :].cpu() + gumbel).topk(length, dim=-1).indices.to(log_probs.device)


def list_log_probs(log_probs: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """(batch, group) Plackett-Luce log-probabilities of ordered lists (batch, group, length) drawn without
    replacement from the normalised ``log_probs`` (batch, n_items)."""
    picked = log_probs[:, None, :].expand(-1, lists.shape[1], -1).gather(2, lists)
    taken = torch.cumsum(picked.exp(), dim=-1) - picked.exp()  # mass drawn before each position
    return (picked - torch.log1p(-taken.clamp(max=1 - 1e-6))).sum(-1)


class GRPOLoss(nn.Module):
    """The ``preference`` task's loss for `CLLM4Rec` on `build_grpo_rows` rows: summed GRPO loss of a
    batch and its row count."""

    def __init__(
        self,
        group: int = 8,
        length: int = 10,
        kl_weight: float = 0.05,
        penalty: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        if group < 2 or length < 1 or kl_weight < 0:
            raise ValueError(
                f"GRPO needs group >= 2, length >= 1, kl_weight >= 0 (got {group}, {length}, {kl_weight})"
            )
        self.group, self.length, self.kl_weight, self.penalty = group, length, kl_weight, penalty
        self.generator = torch.Generator().manual_seed(seed)

    def forward(
        self, log_probs: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log_probs``: (batch, n_items) policy log-softmax over the catalogue; ``batch["ref_log_probs"]``
        the reference's over the unseen catalogue (``-inf`` at seen items), ``batch["chosen"]`` the target."""
        ref = batch["ref_log_probs"].to(log_probs.dtype)
        unseen = torch.isfinite(ref)
        policy = torch.log_softmax(log_probs.masked_fill(~unseen, -torch.inf), dim=-1)
        lists = sample_lists(policy, self.group, self.length, self.generator)
        rewards = torch.tensor(
            np.stack(
                [
                    rollout_rewards(rows.tolist(), int(target))
                    for rows, target in zip(lists, batch["chosen"], strict=True)
                ]
            ),
            dtype=policy.dtype,
            device=policy.device,
        )
        advantages = group_advantages(rewards)
        policy_term = -(advantages * list_log_probs(policy, lists)).mean(-1) / self.length
        # seen items hold 0 in both (exp(0) * (0 - 0) = 0): no -inf - -inf, whose NaN would reach the gradient
        policy_in, ref_in = policy.masked_fill(~unseen, 0.0), ref.masked_fill(~unseen, 0.0)
        kl = (policy_in.exp() * (policy_in - ref_in)).masked_fill(~unseen, 0.0).sum(-1)
        loss = policy_term + self.kl_weight * kl
        return loss.sum(), torch.tensor(loss.shape[0], device=loss.device)


def build_grpo_rows(
    model: CLLM4Rec,
    prompts: FinetunePrompts,
    histories: Sequence[Sequence[int]],
    per_user: int = 1,
    batch_size: int = 32,
) -> PreferenceDataset:
    """GRPO rows from the (reference) ``model``, for the same cuts as DPO's: the prompt, the held-out
    item (``chosen``) and the reference's log-softmax over the items outside the user's training history
    but the held-out one (``ref_log_probs``, ``-inf`` elsewhere): the rollouts' catalogue."""
    rows = []
    for (user, t), ids, log_probs in reference_log_probs(model, prompts, histories, per_user, batch_size):
        chosen = int(histories[user][t])
        masked = log_probs.clone()
        masked[np.asarray(histories[user], dtype=np.int64)] = -torch.inf
        masked[chosen] = log_probs[chosen]
        rows.append(
            {
                "task": TASKS.index("preference"),
                "input_ids": ids,
                "chosen": chosen,
                "ref_log_probs": torch.log_softmax(masked, dim=-1).tolist(),
            }
        )
    return PreferenceDataset(rows)
