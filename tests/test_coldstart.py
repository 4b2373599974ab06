"""Cold items on a tiny model: the ridge mapper, fold-in and catalogue growth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep import load_bundle
from data_prep.build import BuildConfig, build
from data_prep.cold import cold_ids
from llmrec.backbone import BackboneConfig
from llmrec.coldstart import cold_start, fold_in, fold_in_items
from llmrec.collate import PretrainDataset, collate
from llmrec.indexing.encoders import item_embeddings
from llmrec.mapper import Ridge, TextToID, extend_items, item_rows, item_texts, neighbour_rows
from llmrec.metrics import evaluate_cold_items, evaluate_matrices, evaluate_scorer
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.pipeline import scorer_for
from llmrec.prompts import FinetunePrompts, prompt_batch

N_USERS, N_ITEMS = 5, 30
TEMPLATE = "<item_{item}> is described as:"


def tiny_model(head: str = "tied", **config) -> CLLM4Rec:
    return CLLM4Rec.from_config(
        ModelConfig(lora_r=4, head=head, **config), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS, seed=0
    )


class Fixed:
    """Scores given in advance (`llmrec.metrics.Scorer`)."""

    def __init__(self, scores: np.ndarray):
        self.scores = scores

    def score(self, users: np.ndarray) -> np.ndarray:
        return self.scores[users]


def test_ridge_recovers_a_linear_map_and_picks_small_l2_without_noise():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 4, generator=gen), torch.randn(4, 3, generator=gen)
    y = x @ w + 2.0
    ridge = Ridge.fit(x, y)
    assert ridge.l2 == 1e-3
    assert torch.allclose(ridge(x), y, atol=1e-3)
    noisy = Ridge.fit(x, torch.randn(50, 3, generator=gen))  # no signal: the largest penalty wins
    assert noisy.l2 == 1e4


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_mapper_sets_every_row_of_the_new_items_only(head):
    model = tiny_model(head)
    emb = np.random.default_rng(0).normal(size=(N_ITEMS, 8)).astype(np.float32)
    warm, cold = np.arange(24), np.arange(24, N_ITEMS)
    mapper = TextToID.fit(model, emb, warm, encoder="test")
    before = item_rows(model)
    mapper.apply(model, cold, emb[cold])
    after = item_rows(model)
    assert torch.equal(after[warm], before[warm])
    assert torch.allclose(after[cold], mapper.ridge(torch.from_numpy(emb[cold])), atol=1e-6)
    hidden = model.collab.family_weight("item").shape[1]
    assert after.shape[1] == (3 * hidden + 1 if head == "untied" else 2 * hidden)


def test_mapper_save_load(tmp_path):
    model = tiny_model()
    emb = np.random.default_rng(1).normal(size=(N_ITEMS, 8)).astype(np.float32)
    mapper = TextToID.fit(model, emb, np.arange(20), encoder="backbone:tiny-llama")
    mapper.save(tmp_path / "m.safetensors")
    loaded = TextToID.load(tmp_path / "m.safetensors")
    assert loaded.encoder == "backbone:tiny-llama" and loaded.ridge.l2 == mapper.ridge.l2
    assert torch.equal(loaded.ridge(torch.from_numpy(emb)), mapper.ridge(torch.from_numpy(emb)))


def content_nll(model, items, texts) -> float:
    rows = [
        {"kind": "item", "prompt": TEMPLATE.format(item=i), "main": t}
        for i, t in zip(items, texts, strict=True)
    ]
    data = PretrainDataset(rows, model.vocab, model.tokenizer)
    with torch.no_grad():
        total, count = model.content_loss(collate([data[i] for i in range(len(rows))]))
    return float(total / count)


def test_fold_in_fits_only_the_new_items_content_rows():
    model = tiny_model()
    items, texts = [26, 28], ["a heist film in los angeles", "a space opera"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    before = content_nll(model, items, texts)
    rows = fold_in(model, items, texts, TEMPLATE, steps=15, lr=0.05)
    assert content_nll(model, items, texts) < before - 0.01  # one embedding row of a random tiny LM
    assert torch.equal(rows, model.content.family_weight("item")[items])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == {"content.tables.item.weight"}
    diff = (model.content.family_weight("item") != state["content.tables.item.weight"]).any(1)
    assert diff.nonzero().ravel().tolist() == items
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("relation", ["linear", "identity"])
def test_fold_in_items_gives_every_row(relation):
    model = tiny_model("untied")
    before = item_rows(model)
    fold_in_items(model, [29], ["a silent comedy"], TEMPLATE, np.arange(20), relation=relation, steps=2)
    after = item_rows(model)
    assert torch.equal(after[:29], before[:29]) and not torch.equal(after[29], before[29])


def test_extend_items_keeps_old_scores():
    model = tiny_model("untied").eval()
    hidden = torch.randn(3, model.collab.family_weight("item").shape[1])
    old = model.item_logits(hidden)
    new = extend_items(model, 4)
    assert list(new) == [30, 31, 32, 33] and model.vocab.n_items == 34
    assert model.collab.vocab is model.content.vocab is model.vocab
    grown = model.item_logits(hidden)
    assert grown.shape == (3, 34) and torch.allclose(grown[:, :30], old, atol=1e-6, rtol=0)
    assert model.vocab.encode("<item_33>", model.tokenizer) == [model.vocab.item_token(33)]


def test_extend_items_keeps_a_prior_and_history_pool_model_valid(tmp_path):
    model = tiny_model(history_pool="mean", prior="ease", prior_weight=0.5).eval()
    matrix = torch.randn(N_ITEMS, N_ITEMS)
    model.head.fit_prior(matrix)
    prompts = FinetunePrompts(model.vocab, model.tokenizer, "<user_{user}> saw {history}, next", 64)
    encoded = prompt_batch([prompts.encode(0, [1, 2, 3])], pad_token_id=model.tokenizer.pad_token_id or 0)
    batch = (encoded["input_ids"], encoded["attention_mask"])
    old = model.score_parts(*batch)
    extend_items(model, 2)
    grown = model.head.prior.matrix
    assert grown.shape == (N_ITEMS + 2, N_ITEMS + 2)
    assert torch.equal(grown[:N_ITEMS, :N_ITEMS], matrix) and not grown[N_ITEMS:].any()
    history = torch.tensor([[1, 2, 3, N_ITEMS + 1]])  # a new item in the history: the pool and prior read it
    lm, prior = model.score_parts(*batch, history)
    assert (
        lm.shape == prior.shape == (1, N_ITEMS + 2)
        and torch.isfinite(model.score_items(*batch, history)).all()
    )
    same_lm, same_prior = model.score_parts(*batch)
    assert torch.allclose(same_lm[:, :N_ITEMS], old[0], atol=1e-5) and torch.allclose(
        same_prior[:, :N_ITEMS], old[1]
    )
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(CLLM4Rec.from_pretrained(tmp_path / "m").head.prior.matrix, grown)


@pytest.fixture(scope="module")
def cold_bundle(tmp_path_factory):
    from test_data_prep_cold import write_source

    root = tmp_path_factory.mktemp("cold")
    config = BuildConfig(
        input=str(write_source(root / "toy")), out=str(root / "b"), split="cold-items", cold_ratio=0.2
    )
    return load_bundle(build(config))


def test_cold_view_ranks_the_cold_items_among_themselves(cold_bundle):
    cold = cold_ids(cold_bundle.manifest, "items", "test")
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(cold_bundle.n_users, cold_bundle.n_items))
    views = evaluate_cold_items(Fixed(scores), cold_bundle, "test", cold, progress=False)
    assert views["all"] == evaluate_scorer(Fixed(scores), cold_bundle, "test", progress=False)
    seen = cold_bundle.matrix("train") + cold_bundle.matrix("valid")
    only = evaluate_matrices(Fixed(scores[:, cold]), cold_bundle.matrix("test")[:, cold], seen[:, cold])

    def ranking(metrics: dict) -> dict:  # coverage counts the catalogue, skipped users the split
        return {k: v for k, v in metrics.items() if k != "users_skipped" and not k.startswith("coverage")}

    assert ranking(views["cold"]) == pytest.approx(ranking(only))
    boosted = scores.copy()
    boosted[:, np.setdiff1d(np.arange(cold_bundle.n_items), cold)] += 100.0  # warm items first
    again = evaluate_cold_items(Fixed(boosted), cold_bundle, "test", cold, progress=False)
    assert again["cold"] == views["cold"] and again["all"] != views["all"]


@pytest.mark.parametrize("method", ["mapper", "fold-in", "mapper+fold-in"])
def test_cold_start_end_to_end_on_a_cold_bundle(cold_bundle, method):
    model = CLLM4Rec.from_config(
        ModelConfig(lora_r=4), BackboneConfig("tiny-llama"), cold_bundle.n_users, cold_bundle.n_items, seed=0
    )
    cold = cold_ids(cold_bundle.manifest, "items")
    emb = item_embeddings(item_texts(cold_bundle.item_titles, cold_bundle.item_text), "backbone:tiny-llama")
    before = item_rows(model)
    cold_start(model, cold_bundle, method, embeddings=emb, steps=2)
    after = item_rows(model)
    warm = np.setdiff1d(np.arange(cold_bundle.n_items), cold)
    assert torch.equal(after[warm], before[warm])
    assert not torch.isclose(after[cold], before[cold]).all(1).any()  # every cold item got new rows
    test_cold = cold_ids(cold_bundle.manifest, "items", "test")
    views = evaluate_cold_items(
        scorer_for(cold_bundle, model), cold_bundle, "test", test_cold, progress=False
    )
    assert 0 < views["cold"]["users"] <= views["all"]["users"]


def test_neighbour_rows_average_the_nearest_warm_items():
    model = tiny_model()
    emb = np.eye(N_ITEMS, dtype=np.float32)
    emb[29] = emb[3] + emb[5]  # item 29 reads like items 3 and 5, equally
    neighbour_rows(model, emb, np.arange(20), [29], k=2)
    rows = item_rows(model)
    assert torch.allclose(rows[29], (rows[3] + rows[5]) / 2, atol=1e-6)
