"""Ranking metrics against hand-computed rankings and a per-user reference implementation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from llmrec.metrics import (
    RankingMetrics,
    evaluate_matrices,
    evaluate_scorer,
    format_table,
    history_splits,
    is_leave_one_out,
    write_metrics_json,
)


def csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    """Binary csr matrix whose row u holds the items rows[u]."""
    dense = np.zeros((len(rows), n_items), dtype=np.float32)
    for u, items in enumerate(rows):
        dense[u, items] = 1.0
    return sp.csr_matrix(dense)


def reference(scores: np.ndarray, heldout: sp.csr_matrix, exclude: sp.csr_matrix | None, ks) -> dict:
    """Plain per-user loop: stable descending sort, then the textbook definitions."""
    n_users, n_items = scores.shape
    sums: dict[str, float] = {}
    covered = {k: set() for k in ks}
    users = skipped = 0
    for u in range(n_users):
        pos = set(heldout[u].indices.tolist())
        if not pos:
            skipped += 1
            continue
        users += 1
        s = scores[u].astype(np.float64).copy()
        if exclude is not None:
            s[exclude[u].indices] = -np.inf
        ranking = np.argsort(-s, kind="stable")
        for k in ks:
            top = ranking[:k].tolist()
            covered[k].update(top)
            rel = [1.0 if i in pos else 0.0 for i in top]
            n_hit = sum(rel)
            dcg = sum(r / math.log2(j + 2) for j, r in enumerate(rel))
            idcg = sum(1 / math.log2(j + 2) for j in range(min(k, len(pos))))
            first = next((j + 1 for j, r in enumerate(rel) if r), None)
            for name, value in (
                ("recall", n_hit / min(k, len(pos))),
                ("recall_recbole", n_hit / len(pos)),
                ("ndcg", dcg / idcg),
                ("mrr", 1 / first if first else 0.0),
                ("hit", float(n_hit > 0)),
            ):
                sums[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0.0) + value
    out = {key: value / users for key, value in sums.items()}
    out.update({f"coverage@{k}": len(covered[k]) / n_items for k in ks})
    out.update(users=users, users_skipped=skipped)
    return out


def compute(scores, heldout, exclude=None, ks=(1, 2, 3)) -> dict:
    metrics = RankingMetrics(heldout.shape[1], ks)
    metrics.update(scores, heldout, exclude)
    return metrics.compute()


def test_hand_computed_ranking():
    # ranking by score: item 1 (0.9), 4 (0.7), 2 (0.5), 3 (0.3), 0 (0.1); held out: {0, 2, 4}
    scores = np.array([[0.1, 0.9, 0.5, 0.3, 0.7]], dtype=np.float32)
    m = compute(scores, csr([[0, 2, 4]], 5))
    assert m["recall@1"] == 0 and m["hit@1"] == 0 and m["mrr@1"] == 0 and m["ndcg@1"] == 0
    assert m["recall@2"] == pytest.approx(1 / 2)  # one hit over min(2, 3)
    assert m["recall_recbole@2"] == pytest.approx(1 / 3)  # one hit over all 3 held-out items
    assert m["recall@3"] == pytest.approx(2 / 3) and m["recall_recbole@3"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / 2) / (1 + 1 / math.log2(3) + 1 / 2))
    assert m["mrr@2"] == pytest.approx(1 / 2) and m["mrr@3"] == pytest.approx(1 / 2)
    assert m["hit@2"] == 1 and m["hit@3"] == 1
    assert m["coverage@1"] == pytest.approx(1 / 5) and m["coverage@3"] == pytest.approx(3 / 5)
    assert m["users"] == 1 and m["users_skipped"] == 0


def test_fewer_heldout_than_k():
    # one held-out item at rank 2: recall@3 = 1 / min(3, 1) = 1, NDCG over an ideal of one item
    m = compute(np.array([[0.9, 0.8, 0.1, 0.0]]), csr([[1]], 4), ks=(3,))
    assert m["recall@3"] == 1.0 and m["recall_recbole@3"] == 1.0
    assert m["ndcg@3"] == pytest.approx(1 / math.log2(3))


def test_exclusion_removes_seen_items():
    scores = np.array([[0.1, 0.9, 0.5, 0.3, 0.7]])
    # without exclusion item 1 takes rank 1; excluding it, held-out item 4 moves to rank 1
    assert compute(scores, csr([[4]], 5))["hit@1"] == 0
    m = compute(scores, csr([[4]], 5), exclude=csr([[1]], 5))
    assert m["hit@1"] == 1 and m["mrr@1"] == 1 and m["ndcg@1"] == 1
    assert m["coverage@1"] == pytest.approx(1 / 5)


def test_ties_broken_by_lower_index():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    metrics = RankingMetrics(5, ks=(5,))
    assert metrics.topk(scores, 5).tolist() == [[1, 3, 0, 2, 4], [0, 1, 2, 3, 4]]
    assert metrics.topk(scores, 3).tolist() == [[1, 3, 0], [0, 1, 2]]
    # all scores equal: item 0 is ranked first, item 3 falls outside the top 3
    assert compute(np.ones((1, 5)), csr([[0]], 5), ks=(1,))["hit@1"] == 1
    assert compute(np.ones((1, 5)), csr([[3]], 5), ks=(3,))["hit@3"] == 0


def test_topk_matches_stable_sort_with_many_ties():
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.integers(0, 4, size=(64, 50)).astype(np.float32))
    expected = np.argsort(-scores.numpy(), axis=1, kind="stable")
    metrics = RankingMetrics(50)
    for k in (1, 7, 20, 50):
        assert np.array_equal(metrics.topk(scores, k).numpy(), expected[:, :k])


def test_users_without_heldout_are_skipped_and_counted():
    scores = np.array([[0.9, 0.1, 0.2], [0.9, 0.1, 0.2], [0.1, 0.2, 0.9]])
    m = compute(scores, csr([[0], [], [1]], 3), ks=(1,))
    assert m["users"] == 2 and m["users_skipped"] == 1
    assert m["hit@1"] == pytest.approx(0.5)
    # the skipped user's list does not count towards coverage: items 0 and 2 only
    assert m["coverage@1"] == pytest.approx(2 / 3)


def test_matches_reference_over_batches_and_input_types():
    rng = np.random.default_rng(1)
    n_users, n_items, ks = 40, 30, (1, 5, 10, 40)
    scores = rng.integers(0, 6, size=(n_users, n_items)).astype(np.float32)  # many ties
    heldout = sp.csr_matrix(rng.random((n_users, n_items)) < 0.15, dtype=np.float32)
    exclude = sp.csr_matrix(
        (rng.random((n_users, n_items)) < 0.3) & (heldout.toarray() == 0), dtype=np.float32
    )
    expected = reference(scores, heldout, exclude, ks)
    metrics = RankingMetrics(n_items, ks)
    original = scores.copy()
    for start, kind in ((0, "numpy"), (13, "torch"), (27, "numpy")):
        rows = slice(start, {0: 13, 13: 27, 27: n_users}[start])
        batch = scores[rows] if kind == "numpy" else torch.from_numpy(scores[rows])
        metrics.update(batch, heldout[rows], exclude[rows])
    result = metrics.compute()
    assert np.array_equal(scores, original)  # the caller's scores are not modified
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_bad_input_is_rejected():
    metrics = RankingMetrics(3)
    with pytest.raises(ValueError, match="NaN"):
        metrics.update(np.array([[0.1, np.nan, 0.3]]), csr([[0]], 3))
    with pytest.raises(ValueError, match="scores must be"):
        metrics.update(np.zeros((1, 4)), csr([[0]], 4))
    with pytest.raises(ValueError, match="heldout"):
        metrics.update(np.zeros((1, 3)), csr([[0], [1]], 3))


class TinyBundle:
    """Stand-in with the attributes evaluate_scorer uses from data_prep.Bundle."""

    def __init__(self, splits: dict[str, list[list[int]]], n_items: int) -> None:
        self.splits = {name: csr(rows, n_items) for name, rows in splits.items()}
        self.n_users, self.n_items = len(splits["train"]), n_items

    def matrix(self, split: str) -> sp.csr_matrix:
        return self.splits[split]

    def seen(self, split: str) -> sp.csr_matrix:
        return self.splits["train"] + (self.splits["valid"] if split == "test" else 0)


class FixedScorer:
    """Every user gets the same scores; remembers which users it was asked for."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores, self.called = scores, []

    def score(self, users: np.ndarray) -> np.ndarray:
        self.called.append(users.tolist())
        return np.repeat(self.scores, len(users), axis=0)


def test_evaluate_scorer_excludes_train_and_valid_for_test():
    bundle = TinyBundle({"train": [[0], [1], [0]], "valid": [[1], [2], []], "test": [[2], [], [3]]}, 5)
    scorer = FixedScorer(np.array([[5.0, 4.0, 3.0, 2.0, 1.0]]))  # prefers low item indices
    test = evaluate_scorer(scorer, bundle, "test", batch_size=1, ks=(1,), progress=False)
    # user 0: train 0 and valid 1 excluded -> item 2 first (hit); user 2: train 0 excluded -> item 1 (miss)
    assert test["hit@1"] == pytest.approx(0.5) and test["users"] == 2 and test["users_skipped"] == 1
    assert scorer.called == [[0], [2]]  # the user without test items is never scored
    valid = evaluate_scorer(scorer, bundle, "valid", ks=(1,), progress=False)
    # user 0: train 0 excluded -> item 1 (hit); user 1: train 1 excluded -> item 0 (miss)
    assert valid["hit@1"] == pytest.approx(0.5) and valid["users_skipped"] == 1
    subset = evaluate_matrices(scorer, bundle.matrix("test"), bundle.matrix("train"), users=[2], ks=(1,))
    assert subset["users"] == 1 and subset["users_skipped"] == 0
    with pytest.raises(ValueError, match="split"):
        evaluate_scorer(scorer, bundle, "train")


def test_leave_one_out_hr_and_ndcg_against_hand_computed_ranks():
    # 25 items; scores prefer low indices, so the ranking is 0, 1, 2, ... minus the excluded items
    train = [[0, 1], [5], [0], [2]]
    bundle = TinyBundle({"train": train, "valid": [[2], [6], [1], [3]], "test": [[4], [20], [3], []]}, 25)
    assert is_leave_one_out(bundle) and history_splits(bundle, "test") == ("train", "valid")
    assert history_splits(bundle, "valid") == ("train",)
    scores = np.arange(25, 0, -1, dtype=np.float32)[None]
    test = evaluate_scorer(FixedScorer(scores), bundle, "test", progress=False)
    # user 0: 0, 1 (train) and 2 (valid) excluded -> 3, 4: test item 4 at rank 2
    # user 1: 5 and 6 excluded -> 0, 1, 2, 3, 4, 7, ... item 20 at rank 19
    # user 2: 0 and 1 excluded -> 2, 3: item 3 at rank 2; user 3 has no test item
    assert test["users"] == 3 and test["users_skipped"] == 1
    expected = {
        "hr@5": 2 / 3,
        "hr@10": 2 / 3,
        "hr@20": 1.0,
        "ndcg@5": (1 / math.log2(3) + 1 / math.log2(3)) / 3,
        "ndcg@10": (2 / math.log2(3)) / 3,
        "ndcg@20": (2 / math.log2(3) + 1 / math.log2(20)) / 3,
    }
    assert set(expected) <= set(test)
    for key, value in expected.items():
        assert test[key] == pytest.approx(value), key
    # keeping seen items: user 0's item 4 drops to rank 5, user 2's item 3 to rank 4, user 1's to 21
    kept = evaluate_scorer(FixedScorer(scores), bundle, "test", exclude_seen=False, progress=False)
    assert kept["hr@5"] == pytest.approx(2 / 3) and kept["hr@20"] == pytest.approx(2 / 3)
    assert kept["ndcg@5"] == pytest.approx((1 / math.log2(6) + 1 / math.log2(5)) / 3)


def test_a_random_split_bundle_keeps_the_default_cutoffs_and_train_history():
    bundle = TinyBundle({"train": [[0], [1]], "valid": [[1, 2], [3]], "test": [[3], [4]]}, 6)
    assert not is_leave_one_out(bundle) and history_splits(bundle, "test") == ("train",)
    result = evaluate_scorer(FixedScorer(np.zeros((1, 6))), bundle, "test", progress=False)
    assert "recall@100" in result and "hr@10" not in result


def test_format_table():
    table = format_table(
        {"ease": {"recall@20": 0.38921, "users": 943}, "pop": {"recall@20": 0.2}}, ["recall@20", "users"]
    )
    lines = table.splitlines()
    assert lines[0].split() == ["model", "recall@20", "users"]
    assert lines[2].split() == ["ease", "0.3892", "943"]
    assert lines[3].split() == ["pop", "0.2000", "-"]
    assert len({len(line) for line in lines}) == 1


def test_write_metrics_json_writes_meta_and_metrics(tmp_path):
    path = write_metrics_json(tmp_path / "out" / "m.json", {"recall@20": 0.5}, split="test", seed=0)
    assert json.loads(path.read_text()) == {"split": "test", "seed": 0, "metrics": {"recall@20": 0.5}}
