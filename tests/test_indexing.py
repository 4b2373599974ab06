"""Item indexers: unique IDs, prefix trie, RQ-VAE on synthetic clusters, collision resolution, pieces, save/load."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from common.io import ArtifactError
from llmrec.indexing import (
    CollaborativeIndexConfig,
    CollaborativeIndexer,
    IndexData,
    ItemIndex,
    NumberIndexConfig,
    PiecesConfig,
    RQKMeansConfig,
    RQKMeansIndexer,
    RQVAEConfig,
    RQVAEIndexer,
    SequentialIndexer,
    make_indexer,
    train_pieces,
)
from llmrec.indexing.base import collision_stats, describe, digits, shared_attribute_ratio
from llmrec.indexing.collisions import resolve_extra_level, resolve_sinkhorn
from llmrec.indexing.report import format_report, index_report
from llmrec.indexing.rqkmeans import balanced_assignment, residual_kmeans
from llmrec.indexing.rqvae import train_rqvae
from llmrec.tokens import RecVocab
from llmrec.trie import Trie

# quantized training from the first epoch (no autoencoder or decoder phase), lr as in TIGER
SMALL_RQVAE = dict(
    levels=2,
    codebook_size=8,
    latent_dim=8,
    hidden_dims=(32,),
    epochs=150,
    batch_size=128,
    ae_epochs=0,
    decoder_epochs=0,
    lr=1e-3,
    warmup_epochs=0,
)


def clustered(n_clusters: int = 8, per_cluster: int = 40, dim: int = 16, seed: int = 0):
    """Well separated Gaussian blobs: (points, true cluster labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)) * 3
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    return (centres[labels] + rng.standard_normal((len(labels), dim)) * 0.3).astype(np.float32), labels


@pytest.fixture(scope="module")
def interactions() -> pd.DataFrame:
    """Two user communities with disjoint item sets (0..29 and 30..59), item 60 never seen."""
    rng = np.random.default_rng(0)
    rows = []
    for user in range(40):
        pool = np.arange(30) if user < 20 else np.arange(30, 60)
        for item in rng.choice(pool, 8, replace=False):
            rows.append((user, int(item), int(rng.integers(1_000_000))))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


@pytest.fixture(scope="module")
def rqvae_index() -> ItemIndex:
    x = np.random.default_rng(1).standard_normal((160, 16)).astype(np.float32)
    cfg = RQVAEConfig(**{**SMALL_RQVAE, "levels": 3, "codebook_size": 16, "epochs": 100})
    return RQVAEIndexer(cfg).build(IndexData(len(x), embeddings=x))


def test_every_indexer_gives_unique_ids(interactions, rqvae_index):
    n = 61
    data = IndexData(n, interactions=interactions)
    indexes = [
        make_indexer("random", codebook_size=4).build(data),
        make_indexer("sequential", codebook_size=4).build(data),
        make_indexer("collaborative", n_clusters=3, max_leaf=5).build(data),
        rqvae_index,
    ]
    for index in indexes:
        assert index.is_unique(), index.method
        assert index.stats["collision_rate"] == 0.0
        assert len({index.code(i) for i in range(index.n_items)}) == index.n_items
    assert indexes[0].codes.shape == (n, 3)  # 61 items need 3 base-4 digits


def test_sequential_numbers_by_first_appearance():
    inter = pd.DataFrame({"user": [0, 1, 0, 1], "item": [2, 2, 0, 3], "timestamp": [10, 5, 20, 5]})
    index = SequentialIndexer(NumberIndexConfig(codebook_size=10)).build(IndexData(5, interactions=inter))
    # time order: (5, u1, i2), (5, u1, i3), (10, u0, i2), (20, u0, i0); unseen items 1, 4 last
    assert [index.code(i) for i in range(5)] == [(2,), (3,), (0,), (1,), (4,)]


def test_collaborative_groups_co_interacted_items(interactions):
    index = CollaborativeIndexer(CollaborativeIndexConfig(n_clusters=2, max_leaf=40)).build(
        IndexData(61, interactions=interactions)
    )
    first = index.codes[:, 0]
    assert len(set(first[:30])) == 1 and len(set(first[30:60])) == 1 and first[0] != first[30]


def test_digits():
    assert digits(np.arange(9), 3).tolist()[-1] == [2, 2]
    assert digits(np.arange(10), 3).shape == (10, 3)
    assert digits(np.arange(1), 256).shape == (1, 1)


def test_trie_accepts_exactly_the_valid_tuples():
    rng = np.random.default_rng(0)
    space = list(itertools.product(range(3), repeat=3))
    chosen = [space[k] for k in rng.choice(len(space), 12, replace=False)]
    trie = Trie(np.array(chosen))
    valid = set(chosen)
    for length in range(0, 5):
        for codes in itertools.product(range(4), repeat=length):
            assert (codes in trie) == (codes in valid), codes
            expected = sorted({c[length] for c in valid if length < 3 and c[:length] == codes})
            assert trie.allowed(codes).tolist() == expected, codes
    for item, codes in enumerate(chosen):
        assert trie.item(codes) == item
    with pytest.raises(ValueError, match="share the code tuple"):
        Trie(np.array([[0, 1], [2, 2], [0, 1]]), unique=True)


def test_trie_variable_length_tuples():
    codes = np.array([[1, -1, -1], [1, 2, -1], [1, 2, 0], [0, 3, 3]])
    trie = Trie(codes)
    assert (1,) in trie and (1, 2) in trie and (1, 2, 0) in trie and (0, 3) not in trie
    assert trie.allowed((1,)).tolist() == [2] and trie.allowed((1, 2)).tolist() == [0]
    assert trie.allowed((5,)).tolist() == [] and trie.item((0, 3, 3)) == 3
    node = trie.step(trie.step(0, 1), 2)
    assert trie.node_item[node] == 1 and trie.step(node, 7) == -1


def test_rqvae_reduces_loss_and_recovers_clusters():
    x, labels = clustered()
    result = train_rqvae(x, RQVAEConfig(**{**SMALL_RQVAE, "epochs": 300, "dead_code_every": 25}))
    assert result.recon_after < 0.5 * result.recon_before
    first = result.codes[:, 0]
    purity = sum(np.bincount(first[labels == c]).max() for c in range(8)) / len(x)
    assert purity > 0.95
    assert len(set(first)) == 8  # one first-level code per true cluster


def test_rqvae_autoencoder_then_decoder_phase():
    """Default schedule: codes come from k-means of the pretrained latents; the decoder phase keeps them."""
    x, labels = clustered()
    small = {**SMALL_RQVAE, "epochs": 0, "ae_epochs": 100, "cosine_lr": False}  # same lr with or without
    codes_only = train_rqvae(x, RQVAEConfig(**small))
    fitted = train_rqvae(x, RQVAEConfig(**{**small, "decoder_epochs": 50}))
    np.testing.assert_array_equal(fitted.codes, codes_only.codes)
    assert fitted.recon_after < codes_only.recon_after
    first = fitted.codes[:, 0]
    assert sum(np.bincount(first[labels == c]).max() for c in range(8)) / len(x) > 0.95


def test_rqvae_index_stats_and_artifacts(rqvae_index):
    s = rqvae_index.stats
    assert s["recon_mse"] < s["recon_mse_before"]
    assert 0 < s["utilisation"][0] <= 1 and s["perplexity"][0] > 1
    assert "collision_rate_before" in s and "rqvae.safetensors" in rqvae_index.artifacts
    assert "utilisation" in describe(rqvae_index)


def test_collision_resolution_on_duplicates():
    x, _ = clustered(n_clusters=4, per_cluster=10)
    x[1:6] = x[0]  # six identical items can never be told apart by the encoder
    for resolve in ("sinkhorn", "extra_level"):
        cfg = RQVAEConfig(
            **{**SMALL_RQVAE, "levels": 3, "codebook_size": 16, "epochs": 30, "resolve": resolve}
        )
        index = RQVAEIndexer(cfg).build(IndexData(len(x), embeddings=x))
        assert index.stats["collision_rate_before"] > 0 and index.is_unique(), resolve
    extra = resolve_extra_level(np.array([[0, 1], [0, 1], [2, 2], [0, 1]]))
    assert extra[:, 2].tolist() == [0, 1, 0, 2]


def test_sinkhorn_separates_and_refuses_overfull_prefixes():
    codes = np.array([[0, 1], [0, 1], [0, 1], [1, 0]])
    distances = np.random.default_rng(0).random((4, 4))
    fixed, stats = resolve_sinkhorn(codes, distances, epsilon=0.003, iters=50, rounds=5)
    assert collision_stats(fixed)["collision_rate"] == 0 and (fixed[:, 0] == codes[:, 0]).all()
    assert stats["collision_rate_after_sinkhorn"] == 0  # Sinkhorn alone separated distinct items
    with pytest.raises(ValueError, match="share the prefix"):
        resolve_sinkhorn(np.zeros((5, 2), dtype=int), np.zeros((5, 4)), 0.003, 10, 2)


def test_rqkmeans_is_seeded_and_recovers_clusters():
    x, labels = clustered()

    def build(seed: int) -> ItemIndex:
        cfg = RQKMeansConfig(levels=2, codebook_size=8, seed=seed, resolve="extra_level")  # 40 items/blob
        return RQKMeansIndexer(cfg).build(IndexData(len(x), embeddings=x))

    first, again, other = build(0), build(0), build(1)
    np.testing.assert_array_equal(first.codes, again.codes)
    assert first.artifacts == again.artifacts and "rqkmeans.safetensors" in first.artifacts
    assert not np.array_equal(first.codes[:, 1], other.codes[:, 1])  # the seed matters below the blobs
    purity = sum(np.bincount(first.codes[labels == c, 0]).max() for c in range(8)) / len(x)
    assert purity == 1.0 and first.is_unique()
    mse = first.stats["recon_mse_by_level"]
    assert mse[1] < mse[0] < first.stats["embedding_variance"]


def test_balanced_rqkmeans_uses_every_code():
    """Skewed data (one dense blob of 200 points, 7 small ones): every code of every level holds n/K +-1."""
    x, _ = clustered(per_cluster=10)
    x = np.concatenate([x, np.random.default_rng(2).standard_normal((200, 16)).astype(np.float32) * 0.1])
    n, k = len(x), 20  # 14 items per code: a prefix fits in the last level (sinkhorn resolution)
    for balanced in (False, True):
        cfg = RQKMeansConfig(levels=2, codebook_size=k, balanced=balanced)
        raw, *_ = residual_kmeans(torch.from_numpy(x), cfg)
        sizes = [np.bincount(col, minlength=k) for col in raw.T]
        if balanced:
            assert all(set(size.tolist()) <= {n // k, n // k + 1} for size in sizes)
            index = RQKMeansIndexer(cfg).build(IndexData(n, embeddings=x))
            assert index.stats["before_resolution"]["utilisation"] == [1.0, 1.0] and index.is_unique()
        else:  # plain k-means follows the density: the blob's codes are crowded
            assert max(size.max() for size in sizes) > 2 * (n // k + 1)


def test_balanced_assignment_capacities():
    distances = np.array([[0.0, 5.0], [0.1, 5.0], [0.2, 0.3], [9.0, 0.0]])
    # 2 per code: rows 0, 1 and 3 have the largest regrets and take their nearest; row 2 gets what is left
    assert balanced_assignment(distances).tolist() == [0, 0, 1, 1]
    assert np.bincount(balanced_assignment(np.zeros((5, 2))), minlength=2).tolist() == [3, 2]


def test_rqkmeans_collisions_resolved_and_reported():
    x, _ = clustered(n_clusters=4, per_cluster=10)
    x[1:6] = x[0]  # six identical items share every code
    for resolve in ("sinkhorn", "extra_level"):
        cfg = RQKMeansConfig(levels=2, codebook_size=16, resolve=resolve)
        index = RQKMeansIndexer(cfg).build(IndexData(len(x), embeddings=x))
        assert index.stats["collision_rate_before"] > 0 and index.is_unique(), resolve
        report = index_report(index)
        assert (
            report["collisions"]["before"]["max_group"] >= 6
            and report["collisions"]["after"]["max_group"] == 1
        )
        assert report["items_per_leaf"]["after"] == {"1": len(x)}
        assert sum(int(n) * leaves for n, leaves in report["items_per_leaf"]["before"].items()) == len(x)
        assert "collisions before resolution" in format_report(report)
    assert index.codebook_sizes[-1] >= 6  # extra_level numbers the six duplicates


def test_index_report_of_an_index_unique_by_construction(interactions):
    index = make_indexer("sequential", codebook_size=8).build(IndexData(61, interactions=interactions))
    report = index_report(index)
    assert report["collisions"]["before"] == report["collisions"]["after"]
    assert report["items_per_prefix"]["max"] <= 8 and report["reconstruction"] == {}
    assert [level["codes_used_after"] for level in report["levels"]] == [8, 8]


def test_pieces(rqvae_index, tmp_path):
    pieces = train_pieces(rqvae_index, PiecesConfig(vocab_size=64))
    assert pieces.is_unique() and pieces.shared_codebook
    assert pieces.stats["mean_tokens_per_item"] < pieces.stats["fixed_tokens_per_item"]
    vocab = RecVocab(100, 0, rqvae_index.n_items, pieces.codebook_sizes)
    ids = pieces.token_ids(vocab)
    assert ids[pieces.codes >= 0].min() >= vocab.family_range("semantic").start
    assert (ids[pieces.codes < 0] == -1).all()
    with pytest.raises(ValueError, match="must exceed"):
        train_pieces(rqvae_index, PiecesConfig(vocab_size=20))
    loaded = ItemIndex.load(pieces.save(tmp_path / "pieces"))
    assert loaded.artifacts["spm.model"] == pieces.artifacts["spm.model"]


def test_save_load_round_trip(rqvae_index, tmp_path):
    path = rqvae_index.save(tmp_path / "index")
    loaded = ItemIndex.load(path)
    assert np.array_equal(loaded.codes, rqvae_index.codes)
    assert loaded.codebook_sizes == rqvae_index.codebook_sizes and loaded.method == "rqvae"
    assert loaded.stats == rqvae_index.stats
    assert loaded.artifacts == rqvae_index.artifacts
    with pytest.raises(ArtifactError, match="pass --overwrite"):
        rqvae_index.save(path)
    assert rqvae_index.save(path, overwrite=True) == path  # atomic, and leaves no temp dirs
    assert [p.name for p in tmp_path.iterdir()] == ["index"]
    with pytest.raises(FileNotFoundError, match="no item index"):
        ItemIndex.load(tmp_path / "missing")


def test_shared_attribute_ratio():
    codes = np.array([0, 0, 1, 1])
    attrs = [{"a"}, {"a", "b"}, {"c"}, {"d"}]
    r = shared_attribute_ratio(codes, attrs)
    # same-code pairs (0,1) share, (2,3) do not: 1/2; all 6 pairs: only (0,1) shares: 1/6
    assert r["p_share_same_code"] == 0.5 and r["p_share_random_pair"] == pytest.approx(1 / 6)
    assert r["ratio"] == pytest.approx(3.0)


def test_item_index_validation():
    with pytest.raises(ValueError, match="padding"):
        ItemIndex(np.array([[0, -1, 1]]), (2, 2, 2), "x")
    with pytest.raises(ValueError, match="codebook size"):
        ItemIndex(np.array([[0, 5]]), (2, 2), "x")
