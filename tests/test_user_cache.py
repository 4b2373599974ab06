"""The Recommender's cache of known users (`llmrec.scoring.UserStates`): cached and incremental scores
equal the full forward pass of the same prompts, on a tiny model with every head path switched on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_trainable
from test_recommender import N_ITEMS, N_USERS, data  # noqa: F401  (data is a fixture)

from data_prep import load_bundle
from llmrec.backbone import BackboneConfig
from llmrec.export import export_model
from llmrec.head import ItemItemPrior
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.recommender import Recommender
from llmrec.scoring import ItemHeadScorer

TOLERANCE = 1e-4
# the untied head, the pooled history and the EASE prior all take part in the cached scores
CONFIG = ModelConfig(lora_r=2, head="untied", history_pool="mean", prior="ease", prior_weight=0.5)


@pytest.fixture(scope="module")
def bundle(data, tmp_path_factory) -> Path:  # noqa: F811
    b = load_bundle(data)
    model = CLLM4Rec.from_config(CONFIG, BackboneConfig("tiny-llama"), b.n_users, b.n_items, seed=3)
    perturb_trainable(model)
    with torch.no_grad():
        model.head.fit_prior(
            torch.randn(b.n_items, b.n_items, generator=torch.Generator().manual_seed(1)).numpy()
        )
    return export_model(model, b, tmp_path_factory.mktemp("cache") / "bundle")


def recomputed(rec: Recommender, users: list[int]) -> torch.Tensor:
    """Scores from a full forward pass of the users' current prompts (the evaluation path, no cache)."""
    return ItemHeadScorer(rec.model, rec.prompts, rec.histories).score(np.asarray(users))


def forbid_lm(monkeypatch: pytest.MonkeyPatch, rec: Recommender) -> None:
    """Until ``monkeypatch.undo()``, any call that runs the recommender's LM fails."""

    def refuse(*args, **kwargs):
        raise AssertionError("the LM ran")

    monkeypatch.setattr(rec.model, "hidden_states", refuse)
    monkeypatch.setattr(rec.model, "hidden_states_cached", refuse)


def test_cached_scores_equal_the_forward_pass_and_skip_the_lm(bundle, monkeypatch):
    rec = Recommender.from_pretrained(bundle, device="cpu", kv_users=4)
    expected = recomputed(rec, list(range(N_USERS)))
    first = rec.score_batch(rec.catalogue.user_ids)  # computes every state once
    forbid_lm(monkeypatch, rec)
    again = rec.score_batch(rec.catalogue.user_ids[::-1])
    top = rec.recommend(rec.catalogue.user_ids[3], k=5)
    monkeypatch.undo()
    assert torch.allclose(first, expected, atol=TOLERANCE, rtol=0)
    assert torch.allclose(again, expected.flip(0), atol=TOLERANCE, rtol=0)
    unseen = expected[3].clone()
    unseen[list(rec.histories[3])] = float("-inf")
    assert [r.index for r in top] == unseen.topk(5).indices.tolist()
    hidden = rec.model.item_weight().shape[1]
    assert len(rec._states.kv) == 4  # the keys and values of the last kv_users prompts only
    assert rec.cache_bytes == N_USERS * hidden * 4 + sum(e.nbytes for e in rec._states.kv.values())
    rec.clear_cache()
    assert rec.cache_bytes == 0 and not rec._states.known.any()


def test_warm_cache_fills_every_state_in_batches(bundle, monkeypatch):
    rec = Recommender.from_pretrained(bundle, device="cpu", kv_users=0)
    rec.warm_cache(batch_size=7)
    assert rec._states.known.all() and not rec._states.kv
    forbid_lm(monkeypatch, rec)
    scores = rec.score_batch(rec.catalogue.user_ids)
    monkeypatch.undo()
    assert torch.allclose(scores, recomputed(rec, list(range(N_USERS))), atol=TOLERANCE, rtol=0)


def test_update_runs_only_the_new_tokens_and_equals_a_full_recompute(bundle):
    rec = Recommender.from_pretrained(bundle, device="cpu", kv_users=2)
    user, raw = 5, rec.catalogue.user_ids[5]
    rec.score(raw)  # caches the prompt's keys and values
    unseen = [i for i in range(N_ITEMS) if i not in set(rec.histories[user])]
    full = len(rec.prompts.encode(user, list(rec.histories[user]) + unseen[:2]))
    lengths = []
    forward = rec.model.hidden_states_cached

    def counting(input_ids, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        return forward(input_ids, *args, **kwargs)

    rec.model.hidden_states_cached = counting
    assert rec.update(raw, [rec.catalogue.item_ids[i] for i in unseen[:2]]) is True
    assert rec.update(raw, [rec.catalogue.item_ids[unseen[2]]]) is True  # again, on the grown cache
    del rec.model.hidden_states_cached
    # the LM ran the new items and the template's text after the history, not the whole prompt
    suffix = full - rec.prompts.encode_parts(user, rec.histories[user][:-1])[1]
    assert suffix > 0 and lengths == [2 + suffix, 1 + suffix] and lengths[0] < full
    assert list(rec.histories[user][-3:]) == unseen[:3]
    assert torch.allclose(rec.score(raw), recomputed(rec, [user])[0], atol=TOLERANCE, rtol=0)
    # the grown history is seen: its new items are no longer recommended
    assert not {r.index for r in rec.recommend(raw, k=N_ITEMS)} & set(unseen[:3])

    # a user whose prompt is not cached (never scored here) is recomputed in full, with the same result
    other = rec.catalogue.user_ids[9]
    assert rec.update(other, [rec.catalogue.item_ids[i] for i in unseen[:1]]) is False
    assert torch.allclose(rec.score(other), recomputed(rec, [9])[0], atol=TOLERANCE, rtol=0)


def test_update_recomputes_when_truncation_drops_old_items(bundle):
    loaded = Recommender.from_pretrained(bundle, device="cpu")
    user = 2
    fixed = len(loaded.prompts.encode(user, []))
    history = list(loaded.histories[user])
    # the prompt holds exactly the user's history: one more item drops the oldest one
    loaded.model.reconfigure(max_doc_tokens=fixed + len(history))
    rec = Recommender(loaded.model, loaded.catalogue, loaded.histories, loaded.templates)
    assert rec.prompts.kept(user, history) == history
    rec.score(rec.catalogue.user_ids[user])
    new = next(i for i in range(N_ITEMS) if i not in history)
    assert rec.update(rec.catalogue.user_ids[user], [rec.catalogue.item_ids[new]]) is False
    assert rec.prompts.kept(user, rec.histories[user]) == history[1:] + [new]
    expected = recomputed(rec, [user])[0]
    assert torch.allclose(rec.score(rec.catalogue.user_ids[user]), expected, atol=TOLERANCE, rtol=0)


def test_add_items_extends_cached_users_to_the_new_items(bundle, monkeypatch):
    rec = Recommender.from_pretrained(bundle, device="cpu")
    rec.warm_cache()
    rec.add_items([{"id": "new1", "title": "Movie number 3 returns"}, {"id": "new2", "title": "A film"}])
    forbid_lm(monkeypatch, rec)
    cached = rec.score_batch(rec.catalogue.user_ids)
    monkeypatch.undo()
    assert cached.shape == (N_USERS, N_ITEMS + 2)
    assert torch.allclose(cached, recomputed(rec, list(range(N_USERS))), atol=TOLERANCE, rtol=0)
    # a cached prompt keeps growing after the catalogue did, and may take a new item
    raw = rec.catalogue.user_ids[N_USERS - 1]
    assert rec.update(raw, ["new1"]) is True
    assert torch.allclose(rec.score(raw), recomputed(rec, [N_USERS - 1])[0], atol=TOLERANCE, rtol=0)


def test_cold_histories_bypass_the_cache(bundle):
    rec = Recommender.from_pretrained(bundle, device="cpu")
    cold = rec.score(history=["m1", "m2"])
    rec.warm_cache()
    rec.update(rec.catalogue.user_ids[0], ["m1"])
    assert torch.equal(rec.score(history=["m1", "m2"]), cold)
    fresh = Recommender.from_pretrained(bundle, device="cpu")
    assert torch.allclose(fresh.score(history=["m1", "m2"]), cold, atol=1e-6, rtol=0)
    assert not fresh._states.known.any()  # a cold history stores no state


def test_update_refuses_bad_input(bundle):
    rec = Recommender.from_pretrained(bundle, device="cpu")
    with pytest.raises(ValueError, match="non-empty list of item ids"):
        rec.update(rec.catalogue.user_ids[0], [])
    with pytest.raises(ValueError, match="nope"):
        rec.update(rec.catalogue.user_ids[0], ["nope"])
    with pytest.raises(ValueError, match="unseen in training"):
        rec.update("stranger", ["m1"])


def test_prior_of_item_lists_equals_the_prior_of_their_bags():
    prior = ItemItemPrior(6)
    prior.fit(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)).numpy())
    items = [[1, 4, 1], [], [5]]  # repeats count once, as in a 0/1 bag
    bag = torch.zeros(3, 6)
    for row, chosen in enumerate(items):
        bag[row, chosen] = 1.0
    assert torch.allclose(prior.of_items(items), prior(bag), atol=1e-6, rtol=0)
