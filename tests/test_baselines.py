"""Pop, EASE and Mult-VAE on tiny data built in code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import recipe_main

from llmrec.baselines import EASE, MultVAE, Pop, SASRec, SASRecNet, make_baseline
from llmrec.metrics import evaluate_matrices

REPO = Path(__file__).resolve().parents[1]


def random_binary(n_users: int, n_items: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix(rng.random((n_users, n_items)) < density, dtype=np.float32)


def planted(n_groups: int = 4, items_per_group: int = 10, users_per_group: int = 40, seed: int = 0):
    """Users in groups that only touch their group's items; every item is equally popular overall."""
    rng = np.random.default_rng(seed)
    n_items = n_groups * items_per_group
    splits = {"train": [], "test": []}
    for group in range(n_groups):
        items = np.arange(group * items_per_group, (group + 1) * items_per_group)
        for _ in range(users_per_group):
            chosen = rng.permutation(items)[:7]
            splits["train"].append(chosen[:5])
            splits["test"].append(chosen[5:])

    def to_csr(rows):
        dense = np.zeros((len(rows), n_items), dtype=np.float32)
        for u, items in enumerate(rows):
            dense[u, items] = 1.0
        return sp.csr_matrix(dense)

    return to_csr(splits["train"]), to_csr(splits["test"])


def test_pop_scores_training_counts():
    train = sp.csr_matrix(np.array([[1, 0, 2, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=np.float32))
    model = Pop().fit(train)
    scores = model.score(np.array([0, 2]))
    # counts are of users (a stored 2 counts once), identical for every user
    assert scores.dtype == np.float32 and scores.tolist() == [[3, 1, 1, 0], [3, 1, 1, 0]]


def test_ease_closed_form_matches_constrained_least_squares():
    x = random_binary(30, 6, 0.4, seed=0).toarray().astype(np.float64)
    lam = 2.5
    model = EASE(lambdas=[lam]).fit(sp.csr_matrix(x))
    # solve min ||X - XB||² + λ||B||² s.t. diag(B) = 0 directly: column j regresses X[:, j] on the other items
    expected = np.zeros((6, 6))
    for j in range(6):
        others = [i for i in range(6) if i != j]
        a = x[:, others]
        expected[others, j] = np.linalg.solve(a.T @ a + lam * np.eye(5), a.T @ x[:, j])
    np.testing.assert_allclose(model.weights, expected, rtol=1e-4, atol=1e-6)
    history = sp.csr_matrix(x)
    np.testing.assert_allclose(model.score_rows(history[[3, 7]]), x[[3, 7]] @ expected, rtol=1e-4, atol=1e-5)


def test_ease_chooses_lambda_on_valid():
    train = random_binary(60, 20, 0.3, seed=1)
    valid = random_binary(60, 20, 0.1, seed=2)
    valid = valid - valid.multiply(train)
    model = EASE(lambdas=[0.1, 10.0, 1000.0]).fit(train, valid)
    grid = model.fit_info["grid"]
    assert set(grid) == {0.1, 10.0, 1000.0}
    assert model.lam == max(grid, key=grid.get) == model.fit_info["lambda"]
    chosen = EASE(lambdas=[model.lam]).fit(train)
    np.testing.assert_array_equal(chosen.weights, model.weights)
    with pytest.raises(ValueError, match="valid"):
        EASE(lambdas=[1.0, 2.0]).fit(train)


def test_multvae_learns_planted_groups_better_than_pop_and_is_seeded():
    train, test = planted()

    def recall(model) -> float:  # a perfect model puts the 5 unseen group items first: recall@5 = 1
        scores = evaluate_matrices(model, test, train, ks=(5,))
        return scores["recall@5"]

    kwargs = dict(
        hidden=32, latent=8, epochs=20, batch_size=32, lr=1e-2, anneal_steps=200, device="cpu", seed=3
    )
    vae = MultVAE(**kwargs).fit(train, test)
    assert 1 <= vae.fit_info["best_epoch"] <= 20 and vae.fit_info["final_beta"] == pytest.approx(0.2)
    vae_recall, pop_recall = recall(vae), recall(Pop().fit(train))
    assert vae_recall > 0.95 and pop_recall < 0.3, (vae_recall, pop_recall)
    short = {**kwargs, "epochs": 3}  # same seed, same weights (checked on a short run to keep the test fast)
    first, second = MultVAE(**short).fit(train), MultVAE(**short).fit(train)
    np.testing.assert_array_equal(first.score(np.arange(10)), second.score(np.arange(10)))
    assert not np.array_equal(
        first.score(np.arange(10)),
        MultVAE(**{**short, "seed": 4}).fit(train).score(np.arange(10)),
    )


def test_interface_errors():
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("svd")
    with pytest.raises(RuntimeError, match="before fit"):
        make_baseline("pop").score(np.array([0]))
    model = make_baseline("ease", lambdas=[1.0]).fit(random_binary(5, 4, 0.5, seed=0))
    with pytest.raises(ValueError, match="items"):
        model.score_rows(random_binary(5, 3, 0.5, seed=0))


def run_recipe(bundle: Path, out: Path, *args: str) -> dict:
    main = recipe_main("baselines")
    return main(["--data", str(bundle), "--out", str(out), *args])


def test_recipe_on_ml100k(ml100k_bundle, tmp_path, capsys):
    out = tmp_path / "baselines.json"
    rows = run_recipe(ml100k_bundle, out, "--models", "pop", "--split", "valid")
    table = capsys.readouterr().out
    assert "valid split" in table and "recall_recbole@20" in table and "pop" in table
    saved = json.loads(out.read_text())
    assert saved["metrics"]["pop"]["recall@20"] == rows["pop"]["recall@20"] > 0.1
    assert saved["metrics"]["pop"]["users"] == 943 and saved["history"] == "train"
    assert saved["config"]["split"] == "valid" and "platform" in saved["machine"]


@pytest.mark.slow
def test_recipe_ease_matches_recbole_on_ml100k(ml100k_bundle, tmp_path):
    """EASE with the λ chosen on valid (300) lands near RecBole 1.2.1's 0.3892 R@20 / 0.4533 N@100 (test)."""
    rows = run_recipe(ml100k_bundle, tmp_path / "b.json", "--models", "ease", "--lambdas", "300")
    assert rows["ease"]["recall_recbole@20"] == pytest.approx(0.3892, abs=0.01)
    assert rows["ease"]["ndcg@100"] == pytest.approx(0.4533, abs=0.01)


def chain_sequences(n_items: int = 30, n_users: int = 60, seed: int = 0):
    """Users walk a fixed random cycle over the items (next = cycle[position + 1]) from random starts;
    valid holds the item after each user's walk."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(n_items)
    successor = np.empty(n_items, dtype=np.int64)
    successor[cycle] = np.roll(cycle, -1)
    sequences, nexts = [], []
    for _ in range(n_users):
        walk = [int(rng.integers(n_items))]
        for _ in range(int(rng.integers(4, 12))):
            walk.append(int(successor[walk[-1]]))
        sequences.append(walk[:-1])
        nexts.append(walk[-1])
    valid = sp.csr_matrix(
        (np.ones(n_users, np.float32), (np.arange(n_users), nexts)), shape=(n_users, n_items)
    )
    return sequences, valid, successor


def test_sasrec_learns_a_deterministic_next_item_chain():
    sequences, valid, successor = chain_sequences(n_users=40)
    model = SASRec(max_len=16, hidden=32, dropouts=(0.1,), epochs=30, batch_size=20, lr=1e-2, seed=0)
    model.fit(sequences, 30, valid)
    # unseen prompts: two-item walks from every item; the top item must be the successor of the last one
    probes = [[int(i), int(successor[i])] for i in range(30)]
    top = model.score_rows(probes).argmax(axis=1)
    assert (top == successor[successor[np.arange(30)]]).mean() >= 0.8
    assert model.fit_info["valid_ndcg@10"] > 0.9 and model.fit_info["dropout"] == 0.1


def test_sasrec_net_ignores_padding_and_starts_small():
    torch.manual_seed(0)
    net = SASRecNet(n_items=30, max_len=12, hidden=16, heads=2, blocks=2, dropout=0.0).eval()
    assert not net.item.weight[0].any() and net.item.weight.std() < 0.05  # N(0, 0.02), padding row zero
    items = torch.tensor([[5, 9, 2, 17]])
    short = net(items)[:, -1]
    for pad in (1, 8):  # padded keys are masked out of attention: the same items give the same state
        padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), items], dim=1)
        torch.testing.assert_close(net(padded)[:, -1], short)
    assert net(torch.zeros(1, 6, dtype=torch.long)).isfinite().all()  # all padding: no NaN


def test_sasrec_is_seeded_and_selects_on_valid():
    sequences, valid, _ = chain_sequences(n_users=20)
    kwargs = dict(max_len=8, hidden=16, dropouts=(0.1, 0.3), epochs=3, batch_size=8, seed=3)
    first = SASRec(**kwargs).fit(sequences, 30, valid)
    second = SASRec(**kwargs).fit(sequences, 30, valid)
    users = np.arange(20)
    np.testing.assert_array_equal(first.score(users), second.score(users))
    np.testing.assert_array_equal(first.score(users), first.score_rows(sequences))
    grid = first.fit_info["grid"]
    assert set(grid) == {0.1, 0.3} and len(grid[0.1]["valid_ndcg@10_by_epoch"]) == 3
    chosen = max(grid, key=lambda d: grid[d]["valid_ndcg@10"])
    assert first.fit_info["dropout"] == chosen
    with pytest.raises(ValueError, match="valid"):
        SASRec(dropouts=(0.1, 0.3)).fit(sequences, 30)


def test_sasrec_windows_make_every_item_but_the_first_a_target_once():
    items = list(range(8))
    newest = SASRec(max_len=3, dropouts=(0.2,))._windows(items)
    windowed = SASRec(max_len=3, dropouts=(0.2,), windows=True)._windows(items)
    assert newest == [items] and SASRec(max_len=3, dropouts=(0.2,))._windows([4]) == []
    targets = [t for window in windowed for t in window[1:][-3:]]  # what _tokens keeps of each row
    assert sorted(targets) == list(range(1, 8))


def test_sasrec_trains_on_every_row_in_every_epoch(monkeypatch):
    sequences, _, _ = chain_sequences(n_users=20)
    rows_seen: list[int] = []
    forward = SASRecNet.forward

    def counting(self, tokens):
        rows_seen.append(tokens.shape[0])
        return forward(self, tokens)

    monkeypatch.setattr(SASRecNet, "forward", counting)
    SASRec(max_len=8, hidden=16, dropouts=(0.1,), epochs=3, batch_size=8, seed=3).fit(sequences, 30)
    assert sum(rows_seen) == 3 * len(sequences)


def test_sasrec_leaves_cold_users_out_of_training_and_scores_them_from_their_history(tmp_path, monkeypatch):
    """``fit_on`` (training rows without the cold users) holds for SASRec as for the matrix baselines."""
    from test_data_prep_cold import write_source

    from data_prep import load_bundle
    from data_prep.build import BuildConfig, build
    from data_prep.cold import cold_ids

    config = BuildConfig(
        input=str(write_source(tmp_path / "toy")), out=str(tmp_path / "b"), split="cold-users"
    )
    bundle = load_bundle(build(config))
    cold = cold_ids(bundle.manifest, "users")
    keep = np.ones(bundle.n_users, dtype=np.float32)
    keep[cold] = 0.0
    fit_on = sp.csr_matrix(sp.diags(keep) @ bundle.matrix("train"))
    trained_on = []
    fit = SASRec.fit
    monkeypatch.setattr(
        SASRec, "fit", lambda self, sequences, *a: trained_on.extend(sequences) or fit(self, sequences, *a)
    )
    recipe_main("baselines")
    fit_scorer = sys.modules["recipes_baselines"].fit_scorer
    model = SASRec(max_len=8, hidden=8, dropouts=(0.1,), epochs=1, seed=0)
    scorer = fit_scorer(model, bundle, "test", fit_on)
    histories = bundle.histories("train")
    assert len(cold) and all(trained_on[u] == [] for u in cold) and all(histories[u] for u in cold)
    warm = [u for u in range(bundle.n_users) if u not in set(cold.tolist())]
    assert all(trained_on[u] == list(histories[u]) for u in warm)
    np.testing.assert_allclose(scorer.score(cold), model.score_rows([histories[u] for u in cold]))
