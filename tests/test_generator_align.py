"""Alignment of the semantic-ID generator (`llmrec.generator_align`): rollouts drawn under the trie, their
code log-probabilities against one code at a time, the GRPO loss against a hand computation, the KL at the
reference, generator S-DPO against pairwise DPO, and recipes/align.py on a generator run end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_trainable, recipe_main, tiny_generator
from safetensors.torch import load_file

from common.config import ConfigError
from llmrec.collate import collate, lm_example
from llmrec.decoding import GenerativeScorer, ModelDecoder, SemanticPrompts, TrieTensors
from llmrec.generator_align import (
    GeneratorDPOLoss,
    GeneratorGRPOLoss,
    build_generator_grpo_rows,
    build_generator_preferences,
    frozen_reference,
    grpo_terms,
    rollout_noise,
    rollout_scores,
    sample_rollouts,
    sequence_log_probs,
)
from llmrec.indexing import ItemIndex, NumberIndexConfig, RandomIndexer
from llmrec.indexing.base import IndexData
from llmrec.model import CLLM4Rec
from llmrec.prompts import TASKS, prompt_batch

REPO = Path(__file__).resolve().parents[1]
SEQUENCE = "<user_{user}> has interacted with {history}"
N_USERS, N_ITEMS = 4, 25
HISTORIES = [[1, 2, 3], [5, 6], [7], [8, 9, 10, 12]]


@pytest.fixture(scope="module")
def generator() -> tuple[ItemIndex, CLLM4Rec]:
    return tiny_generator(N_USERS, N_ITEMS)


@pytest.fixture(scope="module")
def index(generator) -> ItemIndex:
    return generator[0]


@pytest.fixture(scope="module")
def model(generator) -> CLLM4Rec:
    return generator[1]


def prompts_of(model: CLLM4Rec) -> SemanticPrompts:
    return SemanticPrompts(
        model.vocab, model.tokenizer, SEQUENCE, 512, index=model.item_index, history="codes"
    )


def batch_of(model: CLLM4Rec, histories: list[list[int]], user: int | None = None) -> dict[str, torch.Tensor]:
    """Prompts of ``histories``, row ``u`` for user ``u`` (or all for ``user``)."""
    prompts = prompts_of(model)
    encoded = [prompts.encode(u if user is None else user, h) for u, h in enumerate(histories)]
    return prompt_batch(encoded, model.tokenizer.pad_token_id)


def draw(model, histories, group, length, epoch=0, seed=0, user=None):
    trie = TrieTensors(model.item_index)
    batch = batch_of(model, histories, user)
    keys = torch.tensor([[epoch, row] for row in range(len(histories))])
    noise = rollout_noise(keys, seed, (group, length, trie.max_len, trie.max_children))
    remaining = trie.remaining(histories)
    return sample_rollouts(model, batch["input_ids"], batch["attention_mask"], trie, remaining, noise)


def one_code_at_a_time(model, prompt_ids, item, excluded):
    """(log p, log q, per-level log-prob vectors and allowed codes) of ``item``'s codes after one prompt,
    stepping `ModelDecoder` one code at a time; q renormalises each level over the codes that lead to an
    item outside ``excluded``, found by brute force over the catalogue."""
    index = model.item_index
    batch = prompt_batch([prompt_ids], model.tokenizer.pad_token_id)
    decoder = ModelDecoder(model, batch["input_ids"], batch["attention_mask"], TrieTensors(index))
    code = index.code(item)
    allowed_items = [i for i in range(index.n_items) if i not in set(excluded)]
    log_p = log_q = 0.0
    levels = []
    with torch.no_grad():
        logp = decoder.start()[0]
        for depth, c in enumerate(code):
            allowed = sorted(
                {index.code(i)[depth] for i in allowed_items if index.code(i)[:depth] == code[:depth]}
            )
            log_p += float(logp[c])
            log_q += float(logp[c] - torch.logsumexp(logp[allowed], 0))
            levels.append((logp.clone(), allowed))
            if depth + 1 < len(code):
                logp = decoder.advance(torch.tensor([0]), depth, torch.tensor([c]))[0]
    return log_p, log_q, levels


def test_rollouts_are_real_unseen_distinct_items_drawn_the_same_for_the_same_key(model):
    items = draw(model, HISTORIES, group=16, length=4)
    assert items.shape == (4, 16, 4)
    for user, history in enumerate(HISTORIES):
        for row in items[user].tolist():
            assert all(0 <= i < N_ITEMS and i not in history for i in row)
            assert len(set(row)) == 4  # without replacement inside a list
    assert torch.equal(items, draw(model, HISTORIES, group=16, length=4))  # seeded by (seed, epoch, row)
    assert not torch.equal(items, draw(model, HISTORIES, group=16, length=4, epoch=1))
    # a user with 4 items left: every list is a permutation of them, then no item (-1)
    full = [list(range(21))]
    lists = draw(model, full, group=3, length=6, user=0)[0].tolist()
    assert all(sorted(row[:4]) == [21, 22, 23, 24] and row[4:] == [-1, -1] for row in lists)


def test_draws_follow_the_restricted_distribution_whose_log_probs_are_trained(model):
    history = HISTORIES[0]
    users = 20
    items = draw(model, [history] * users, group=200, length=1, user=0).flatten()
    counts = np.bincount(items.numpy(), minlength=N_ITEMS) / len(items)
    prompt = prompts_of(model).encode(0, history)
    expected = np.zeros(N_ITEMS)
    for item in set(range(N_ITEMS)) - set(history):
        expected[item] = math.exp(one_code_at_a_time(model, prompt, item, history)[1])
    assert expected.sum() == pytest.approx(1.0, abs=1e-5)
    assert 0.5 * np.abs(counts - expected).sum() < 0.04  # total variation of 4000 draws


def test_sequence_log_probs_equal_the_sum_of_per_level_log_probs_one_code_at_a_time(model, index):
    items = draw(model, HISTORIES, group=3, length=3)
    trie = TrieTensors(index)
    tokens = torch.as_tensor(index.token_ids(model.vocab))
    batch = batch_of(model, HISTORIES)
    with torch.no_grad():
        scores = rollout_scores(
            model, batch["input_ids"], batch["attention_mask"], items, trie, tokens, trie.remaining(HISTORIES)
        )
    prompts = prompts_of(model)
    first = model.vocab.family_range("semantic").start
    for user, history in enumerate(HISTORIES):
        prompt = prompts.encode(user, history)
        for g in range(3):
            for k in range(3):
                item = int(items[user, g, k])
                earlier = items[user, g, :k].tolist()
                log_p, log_q, _ = one_code_at_a_time(model, prompt, item, history + earlier)
                assert float(scores.log_p[user, g, k]) == pytest.approx(log_p, abs=1e-4)
                assert float(scores.log_q[user, g, k]) == pytest.approx(log_q, abs=1e-4)
                assert int(scores.codes[user, g, k]) == 3
        # and the unrestricted sum is the teacher-forced NLL of prompt + codes (what SFT trains)
        target = [int(t) for t in tokens[int(items[user, 0, 0])]]
        ids, labels = lm_example(prompt, target, [t - first for t in target])
        with torch.no_grad():
            nll, _ = model.semantic_loss(
                collate([{"task": TASKS.index("semantic"), "input_ids": ids, "labels": labels}])
            )
        assert float(scores.log_p[user, 0, 0]) == pytest.approx(-float(nll), abs=1e-4)
    # one forward for several prompts and tuples = the sequence log-probs of each item on its own
    lone = sequence_log_probs(
        model, batch["input_ids"][:1], batch["attention_mask"][:1], items[:1, 0], trie, tokens
    )
    torch.testing.assert_close(lone.detach(), scores.log_p[:1, 0].detach(), rtol=0, atol=1e-5)


def test_grpo_terms_match_a_hand_computation():
    log_q = torch.tensor([[[-1.0, -2.0], [-3.0, -0.5]]])  # 1 prompt, 2 rollouts of 2 items
    codes = torch.tensor([[[3, 3], [3, 2]]])
    advantages = torch.tensor([[1.0, -1.0]])
    kl = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])
    loss = grpo_terms(log_q, codes, advantages, kl, kl_weight=0.5)
    expected = -0.5 * (1.0 * -3.0 / 6 + -1.0 * -3.5 / 5) + 0.5 * 1.0 / 4
    assert float(loss[0]) == pytest.approx(expected, rel=1e-6)


def test_the_grpo_loss_of_hand_made_rollouts_is_the_hand_computed_one(model, index):
    reference = frozen_reference(model)
    policy = copy.deepcopy(model)
    perturb_trainable(policy, 0.05)
    policy.eval()
    histories = [HISTORIES[0], HISTORIES[3]]
    chosen = [4, 11]
    items = torch.tensor([[[4, 0], [0, 4], [13, 14]], [[11, 20], [20, 21], [21, 20]]])
    batch = dict(batch_of(policy, histories), chosen=torch.tensor(chosen))
    batch["excluded"] = torch.tensor([[1, 2, 3, -1], [8, 9, 10, 12]])
    loss_fn = GeneratorGRPOLoss(reference, group=3, length=2, kl_weight=0.3)
    total, count = loss_fn.loss_of(policy, batch, items)
    assert int(count) == 2
    prompts = prompts_of(policy)
    expected = 0.0
    for row, (history, target) in enumerate(zip(histories, chosen, strict=True)):
        rewards = []
        log_q, codes, kls = [], [], []
        for g in range(3):
            lst = items[row, g].tolist()
            rewards.append(sum(1 / math.log2(rank + 2) for rank, i in enumerate(lst) if i == target))
            rollout_q, rollout_codes = 0.0, 0
            for k, item in enumerate(lst):
                excluded = history + lst[:k]
                prompt = prompts.encode(row, history)
                _, q, mine = one_code_at_a_time(policy, prompt, item, excluded)
                _, _, theirs = one_code_at_a_time(reference, prompt, item, excluded)
                rollout_q += q
                rollout_codes += len(mine)
                kl = 0.0
                for (lp, allowed), (lr, _) in zip(mine, theirs, strict=True):
                    p = torch.log_softmax(lp[allowed], 0)
                    r = torch.log_softmax(lr[allowed], 0)
                    kl += float((p.exp() * (p - r)).sum())
                kls.append(kl)
            log_q.append(rollout_q)
            codes.append(rollout_codes)
        rewards = np.array(rewards)
        advantages = (rewards - rewards.mean()) / rewards.std()
        policy_term = -np.mean([a * q / c for a, q, c in zip(advantages, log_q, codes, strict=True)])
        expected += policy_term + 0.3 * np.mean(kls)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-4)
    total.backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_kl_is_zero_at_the_reference_and_the_loss_too_without_a_preference(model, index):
    rows = build_generator_grpo_rows(prompts_of(model), HISTORIES, per_user=1)
    assert [row["chosen"] for row in rows.rows] == [3, 6, 12]
    assert all(row["chosen"] not in row["excluded"] for row in rows.rows)
    batch = collate([rows[i] for i in range(len(rows))])
    assert batch["rollout_key"].tolist() == [[0, 0], [0, 1], [0, 2]]
    loss_fn = GeneratorGRPOLoss(frozen_reference(model), group=4, length=2, kl_weight=1.0)
    trie = TrieTensors(index)
    tokens = torch.as_tensor(index.token_ids(model.vocab))
    items = torch.tensor([[[0, 4], [4, 0], [13, 14], [14, 13]]] * 3)  # never a chosen item: rewards all 0
    remaining = loss_fn.remaining(trie, batch)
    scores = rollout_scores(
        model, batch["input_ids"], batch["attention_mask"], items, trie, tokens, remaining, loss_fn.reference
    )
    assert float(scores.kl.abs().max()) < 1e-6
    total, _ = loss_fn.loss_of(model, batch, items)
    assert float(total) == pytest.approx(0.0, abs=1e-6)
    # a moved policy has a positive KL, and the whole task runs through CLLM4Rec.forward
    policy = copy.deepcopy(model)
    perturb_trainable(policy, 0.05)
    policy.train()
    policy.preference = loss_fn
    moved = rollout_scores(
        policy, batch["input_ids"], batch["attention_mask"], items, trie, tokens, remaining, loss_fn.reference
    )
    assert float(moved.kl.min()) > 0
    lm_sum, lm_count, _, _ = policy(batch)
    assert policy.training and int(lm_count) == 3 and torch.isfinite(lm_sum)


def test_grpo_steps_raise_the_chosen_items_probability(model, index):
    policy = copy.deepcopy(model)
    with torch.no_grad():  # the fresh, near-uniform codes: every chosen item is drawn now and then
        policy.collab.family_weight("semantic").div_(20)
    rows = build_generator_grpo_rows(prompts_of(policy), HISTORIES, per_user=1)
    policy.preference = GeneratorGRPOLoss(frozen_reference(policy), group=8, length=3, kl_weight=0.01)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=3e-3)
    trie = TrieTensors(index)
    tokens = torch.as_tensor(index.token_ids(policy.vocab))
    chosen = torch.tensor([row["chosen"] for row in rows.rows])[:, None]

    def chosen_log_q() -> torch.Tensor:
        batch = collate([rows[i] for i in range(len(rows))])
        remaining = policy.preference.remaining(trie, batch)
        with torch.no_grad():
            return rollout_scores(
                policy,
                batch["input_ids"],
                batch["attention_mask"],
                chosen[..., None],
                trie,
                tokens,
                remaining,
            ).log_q[:, 0, 0]

    start = chosen_log_q()
    for epoch in range(15):
        rows.set_epoch(epoch)
        lm_sum, lm_count, _, _ = policy(collate([rows[i] for i in range(len(rows))]))
        optimizer.zero_grad()
        (lm_sum / lm_count).backward()
        optimizer.step()
    end = chosen_log_q()
    assert (end > start).all()


def test_generator_sdpo_with_one_rejected_item_is_pairwise_dpo(model, index):
    prompts = prompts_of(model)
    rows = build_generator_preferences(model, prompts, HISTORIES, per_user=1, n_rejected=1)
    # the rejected item is the SFT beam's best item outside the user's training history
    for row, (user, history) in zip(
        rows.rows, [(0, HISTORIES[0]), (1, HISTORIES[1]), (3, HISTORIES[3])], strict=True
    ):
        cut = history[:-1]
        scorer = GenerativeScorer(model, prompts, {user: cut}, beam=1)
        best, _ = scorer.recommend([user], excluded=[history])
        assert row["rejected"] == [int(best[0, 0])] and row["chosen"] == history[-1]
    batch = collate(rows.rows)
    policy = copy.deepcopy(model)
    perturb_trainable(policy, 0.05)
    policy.eval()
    with torch.no_grad():
        at_start = GeneratorDPOLoss(beta=0.5, loss="sdpo")(model, batch)[0]
        sdpo = GeneratorDPOLoss(beta=0.5, sft_weight=0.1, loss="sdpo")(policy, batch)[0]
        dpo = GeneratorDPOLoss(beta=0.5, sft_weight=0.1, loss="dpo")(policy, batch)[0]
    assert float(at_start) == pytest.approx(3 * math.log(2), rel=1e-5)  # the policy is the reference
    assert float(sdpo) == pytest.approx(float(dpo), rel=1e-6) and float(sdpo) != pytest.approx(
        float(at_start)
    )
    many = build_generator_preferences(
        model, prompts, HISTORIES, per_user=1, n_rejected=3, n_random=2, seed=1
    )
    again = build_generator_preferences(
        model, prompts, HISTORIES, per_user=1, n_rejected=3, n_random=2, seed=1
    )
    assert [r["rejected"] for r in many.rows] == [r["rejected"] for r in again.rows]
    for row, history in zip(many.rows, [HISTORIES[0], HISTORIES[1], HISTORIES[3]], strict=True):
        assert len(set(row["rejected"])) == 5 and not set(row["rejected"]) & set(history)
    model.preference = GeneratorDPOLoss(beta=0.5, loss="sdpo")
    lm_sum, lm_count, _, _ = model(collate(many.rows))  # through CLLM4Rec.forward's task dispatch
    model.preference = None
    assert int(lm_count) == 3 and torch.isfinite(lm_sum)


# ---------------------------------------------------------------- recipes/align.py on a generator run
@pytest.fixture(scope="module")
def loo_bundle(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_prep.build import build_ml100k_reference

    return build_ml100k_reference(
        shared_dir, tmp_path_factory.mktemp("bundles") / "ml-100k-loo", "ml-100k-loo"
    )


def align_args(bundle: Path, init: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(bundle), "--init", str(init), "--output_dir", str(out), "--pairs_per_user", "1",
        "--loss", "grpo", "--grpo_group", "4", "--grpo_length", "2", "--batch_size", "32",
        "--max_steps", "4", "--save_steps", "2", "--log_steps", "1", "--warmup_ratio", "0",
        "--eval_batch_size", "256", "--lr", "1e-3", *extra,
    ]  # fmt: skip


def test_align_recipe_on_a_generator_run_end_to_end_and_resume_after_a_kill(
    loo_bundle, tmp_path, kill_after_checkpoint
):
    from data_prep import load_bundle

    bundle = load_bundle(loo_bundle)
    index = RandomIndexer(NumberIndexConfig(codebook_size=12)).build(IndexData(n_items=bundle.n_items))
    index.save(tmp_path / "index")
    sft = tmp_path / "sft"
    recipe_main("finetune")(
        ["--data", str(loo_bundle), "--output_dir", str(sft), "--name_or_path", "tiny-llama", "--lora_r", "4"]
        + ["--max_doc_tokens", "64", "--index", str(tmp_path / "index"), "--task", "semantic_sequence"]
        + ["--with_content", "false", "--max_steps", "2", "--batch_size", "16", "--eval_batch_size", "256"]
    )
    align = recipe_main("align")
    reference = tmp_path / "grpo"
    with pytest.raises(ConfigError, match="is a generator run"):  # no prior blend to choose
        align([*align_args(loo_bundle, sft, reference), "--prior_weight", "choose"])
    assert not reference.exists()
    align(align_args(loo_bundle, sft, reference))
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(row.get("loss/semantic_preference", np.nan)) for row in rows)
    assert any("eval/ndcg@10" in row for row in rows)  # validated by the generator's beam search
    config = json.loads((reference / "run_config.json").read_text())
    assert config["task"] == "semantic_sequence" and config["eval"]["beam"] == 20
    assert (reference / "best" / "index").is_dir() and (reference / "model" / "config.json").is_file()

    out = tmp_path / "sdpo"  # S-DPO through the same recipe and loop
    align(
        [
            *align_args(loo_bundle, sft, out, "--loss", "sdpo", "--n_rejected", "2", "--n_random", "2"),
            "--max_steps",
            "2",
        ]
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(row.get("loss/semantic_preference", np.nan)) for row in rows)
    assert (out / "best" / "config.json").is_file()

    killed = tmp_path / "killed"
    kill_after_checkpoint(
        [str(REPO / "recipes" / "align.py"), *align_args(loo_bundle, sft, killed)], killed, "checkpoint_2"
    )
    assert not (killed / "model").exists()
    align(align_args(loo_bundle, sft, killed, "--resume", "true"))
    expected = load_file(reference / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:  # the same rollouts after the resume: (seed, epoch, row) seeds them
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    start = load_file(sft / "best" / "model.safetensors")
    assert any(not torch.equal(start[name], expected[name]) for name in expected)  # GRPO moved the weights
