"""The ML-100K bundle on the shared fixed split: the issue's acceptance numbers and the Bundle API."""

from __future__ import annotations

import numpy as np

from data_prep import Templates, load_bundle


def test_ml100k_presplit_counts(ml100k_bundle):
    b = load_bundle(ml100k_bundle)
    assert (b.n_users, b.n_items) == (943, 1682)
    assert [len(b.interactions(s)) for s in ("train", "valid", "test")] == [80024, 9988, 9988]
    assert b.manifest["counts"]["train"] == 80024
    assert b.manifest["split"]["protocol"] == "presplit"


def test_ml100k_id_maps_and_text(ml100k_bundle):
    b = load_bundle(ml100k_bundle)
    assert b.item_ids[0] == "1" and b.item_index["1"] == 0 and b.user_index[b.user_ids[42]] == 42
    assert b.item_titles[0] == "Toy Story (1995)"
    assert b.item_text[0] == "Toy Story (1995); genres: Animation, Children's, Comedy"
    assert b.user_text[0] == "24-year-old male technician"
    assert b.templates == Templates()


def test_ml100k_matrix_and_corpora(ml100k_bundle):
    b = load_bundle(ml100k_bundle)
    train = b.matrix("train")
    assert train.shape == (943, 1682) and train.dtype == np.float32 and train.nnz == 80024
    assert set(np.unique(train.data)) == {1.0}
    collab = b.corpus("collaborative")
    assert len(collab) == 943 and collab[0]["prompt"] == "<user_0> has interacted with"
    assert len(collab[0]["main"].split()) == train[0].nnz
    assert len(b.corpus("finetune")) == 943
    assert sorted(set(b.corpus("content")["kind"])) == ["item", "user"]
