"""Alignment losses of the item head: S-DPO against pairwise DPO, GRPO's rewards, advantages, list
probabilities and loss, and the rows both build from a reference model."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from conftest import recipe_main

from common.config import ConfigError
from llmrec.align import DPOLoss, build_preferences, dpo_loss, sdpo_loss
from llmrec.backbone import BackboneConfig
from llmrec.collate import collate
from llmrec.grpo import (
    GRPOLoss,
    build_grpo_rows,
    group_advantages,
    list_log_probs,
    rollout_rewards,
    sample_lists,
)
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.prompts import FinetunePrompts

N_USERS, N_ITEMS = 4, 25
HISTORIES = [[3, 9, 4, 7], [12, 5, 6], [], [2, 8]]


@pytest.fixture(scope="module")
def model() -> CLLM4Rec:
    return CLLM4Rec.from_config(
        ModelConfig(lora_r=4, head="untied"), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS, seed=0
    ).eval()


def prompts_of(model: CLLM4Rec) -> FinetunePrompts:
    return FinetunePrompts(model.vocab, model.tokenizer, "<user_{user}> has interacted with {history}", 512)


def test_sdpo_with_one_rejected_item_is_pairwise_dpo():
    gen = torch.Generator().manual_seed(0)
    chosen, ref_chosen = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    rejected, ref_rejected = torch.randn(6, 1, generator=gen), torch.randn(6, 1, generator=gen)
    for beta, sft in ((0.1, 0.0), (2.0, 0.5)):
        torch.testing.assert_close(
            sdpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, sft),
            dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, sft),
        )


def test_sdpo_matches_a_hand_computed_value_with_many_rejected_items():
    loss = sdpo_loss(
        torch.tensor([-1.0]), torch.tensor([[-2.0, -0.5]]), torch.tensor([-1.5]), torch.tensor([[-1.0, -1.0]]),
        beta=0.5,
    )  # fmt: skip
    # ratios: chosen 0.5, rejected -1.0 and 0.5 -> beta * (m(r) - m(c)) = -0.75 and 0
    expected = -math.log(1 / (1 + math.exp(math.log(math.exp(-0.75) + 1))))
    assert float(loss[0]) == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(
        sdpo_loss(torch.tensor([0.0]), torch.tensor([[1e4]]), torch.zeros(1), torch.zeros(1, 1), 1.0)
    )
    with pytest.raises(ValueError, match="preference loss"):
        DPOLoss(loss="ipo")


def test_rewards_count_the_hit_at_its_rank_and_penalise_bad_items():
    rollouts = [[7, 1, 2], [1, 2, 7], [1, 2, 3], [7, 7, 99], [4, -1, 7]]
    rewards = rollout_rewards(rollouts, target=7, seen=[4], n_items=50, penalty=0.1)
    # hit at rank 1 and 3; a miss; a hit then a repeat and an invalid item; a seen item, an invalid one, hit at 3
    expected = [1.0, 0.5, 0.0, 1.0 - 0.2, 0.5 - 0.2]
    np.testing.assert_allclose(rewards, expected)
    np.testing.assert_allclose(rollout_rewards([[5, 6]], target=6), [1 / math.log2(3)])


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.5, 0.0, 0.5]])
    advantages = group_advantages(rewards)
    std = math.sqrt(0.1875)
    torch.testing.assert_close(advantages[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / std)
    assert torch.equal(advantages[1], torch.zeros(4))  # no preference inside the group
    torch.testing.assert_close(advantages[2], torch.tensor([0.5, 0.0, -0.5, 0.0]) / math.sqrt(0.125))


def test_list_probability_is_plackett_luce():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    lists = torch.tensor([[[1, 0, 2], [2, 1, 0]]])
    expected = [0.3 * (0.5 / 0.7) * 1.0, 0.2 * (0.3 / 0.8) * 1.0]
    torch.testing.assert_close(list_log_probs(probs.log(), lists).exp()[0], torch.tensor(expected))


def test_sampled_lists_are_seeded_distinct_and_skip_masked_items():
    log_probs = torch.log_softmax(torch.randn(3, 30, generator=torch.Generator().manual_seed(1)), -1)
    log_probs[:, :10] = -torch.inf
    draw = [sample_lists(log_probs, 6, 5, torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1]) and draw[0].shape == (3, 6, 5)
    assert (draw[0] >= 10).all()
    assert all(len(set(row.tolist())) == 5 for row in draw[0].reshape(-1, 5))


def test_grpo_raises_the_held_out_item_and_its_kl_is_zero_at_the_reference():
    ref = torch.log_softmax(torch.randn(4, 40, generator=torch.Generator().manual_seed(2)), -1)
    ref[:, :5] = -torch.inf  # seen items
    ref = torch.log_softmax(ref, -1)
    batch = {"chosen": torch.tensor([10, 20, 30, 39]), "ref_log_probs": ref}
    logits = torch.nn.Parameter(ref.masked_fill(torch.isinf(ref), 0.0).clone())
    loss_fn = GRPOLoss(group=8, length=5, kl_weight=0.0, seed=0)
    start = torch.log_softmax(logits.detach(), -1).gather(1, batch["chosen"][:, None])
    optimizer = torch.optim.SGD([logits], lr=1.0)
    for _ in range(60):
        total, count = loss_fn(torch.log_softmax(logits, -1), batch)
        optimizer.zero_grad()
        (total / count).backward()
        assert torch.isfinite(logits.grad).all()
        optimizer.step()
    end = torch.log_softmax(logits.detach().masked_fill(torch.isinf(ref), -torch.inf), -1)
    assert (end.gather(1, batch["chosen"][:, None]) > start).all()
    # at the reference with no preference (equal rewards), the loss is the KL alone: 0
    quiet = GRPOLoss(group=4, length=1, kl_weight=1.0, seed=0)
    total, _ = quiet(
        ref.masked_fill(torch.isinf(ref), -50.0), {"chosen": torch.tensor([0, 1, 2, 3]), "ref_log_probs": ref}
    )
    assert float(total) == pytest.approx(0.0, abs=1e-5)  # targets are seen: never drawn, every reward 0


def test_rows_from_the_reference_model(model):
    prompts = prompts_of(model)
    rows = build_preferences(model, prompts, HISTORIES, per_user=1, n_rejected=3, n_random=4, seed=0).rows
    again = build_preferences(model, prompts, HISTORIES, per_user=1, n_rejected=3, n_random=4, seed=0).rows
    assert [row["rejected"] for row in rows] == [row["rejected"] for row in again]
    for row, history in zip(rows, [HISTORIES[0], HISTORIES[1], HISTORIES[3]], strict=True):
        assert len(set(row["rejected"])) == 7 and not set(row["rejected"]) & set(history)
    random_only = build_preferences(model, prompts, HISTORIES, per_user=1, n_rejected=0, n_random=4, seed=0)
    for row, history in zip(random_only.rows, [HISTORIES[0], HISTORIES[1], HISTORIES[3]], strict=True):
        assert len(set(row["rejected"])) == 4 and not set(row["rejected"]) & set(history)
    grpo = build_grpo_rows(model, prompts, HISTORIES, per_user=1).rows
    for row, history in zip(grpo, [HISTORIES[0], HISTORIES[1], HISTORIES[3]], strict=True):
        ref = torch.tensor(row["ref_log_probs"])
        allowed = torch.isfinite(ref).nonzero()[:, 0].tolist()
        assert set(allowed) == (set(range(N_ITEMS)) - set(history)) | {row["chosen"]}
        assert float(ref[allowed].exp().sum()) == pytest.approx(1.0, abs=1e-5)
    model.preference = GRPOLoss(group=4, length=3, seed=0)
    with torch.no_grad():
        total, count = model.preference_loss(collate(grpo))
    model.preference = None
    assert int(count) == 3 and torch.isfinite(total)


def test_align_args_take_random_rejected_items_only_but_not_none():
    align = sys.modules[recipe_main("align").__module__]

    assert align.AlignArgs(n_rejected=0, n_random=16).n_random == 16  # the S-DPO paper's sampling
    with pytest.raises(ConfigError, match="n_rejected.*when n_random is 0"):
        align.AlignArgs(n_rejected=0, n_random=0)


def test_dpo_loss_matches_a_hand_computed_value():
    loss = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([[-2.0, -0.5]]), torch.tensor([-1.5]), torch.tensor([[-1.0, -1.0]]),
        beta=0.5, sft_weight=0.3,
    )  # fmt: skip
    # ratios: chosen 0.5, rejected -1.0 and 0.5 -> margins 0.5 * 1.5 = 0.75 and 0
    expected = (math.log(1 + math.exp(-0.75)) + math.log(2)) / 2 + 0.3 * 1.0
    assert float(loss[0]) == pytest.approx(expected, rel=1e-6)


def test_the_preference_task_on_a_toy_model_gives_the_hand_computed_loss(model):
    prompts = prompts_of(model)
    histories = [[3, 9, 4, 7], [12, 5, 6], [], [2, 8]]
    data = build_preferences(model, prompts, histories, per_user=2, n_rejected=3)
    # the last two positions of every history with >= 2 items; rejected never in the history
    assert [(row["chosen"]) for row in data.rows] == [4, 7, 5, 6, 8]
    assert all(
        not set(row["rejected"]) & set(h)
        for row, h in zip(data.rows, [histories[0]] * 2 + [histories[1]] * 2 + [histories[3]], strict=True)
    )
    batch = collate(data.rows)
    model.preference = DPOLoss(beta=0.5)
    with torch.no_grad():
        total, count = model.preference_loss(batch)  # the policy is the reference: every margin is 0
        assert int(count) == 5 and float(total) == pytest.approx(5 * math.log(2), rel=1e-5)
        shifted = dict(batch, ref_chosen=batch["ref_chosen"] + 1.0)  # chosen ratio -1: margins -0.5
        total, _ = model.preference_loss(shifted)
        assert float(total) == pytest.approx(5 * math.log(1 + math.exp(0.5)), rel=1e-5)
    model.preference = None
