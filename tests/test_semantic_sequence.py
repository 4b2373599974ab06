"""Every-position semantic-ID training (task ``semantic_sequence``): one forward of a history written in
semantic IDs trains every next item's codes, exactly as one prefix at a time would."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import recipe_main, tiny_generator

from llmrec.backbone import BackboneConfig
from llmrec.collate import collate, lm_example
from llmrec.config import ConfigError
from llmrec.generate import GenerativeScorer, SemanticPrompts, SemanticSequenceDataset, generate_reference
from llmrec.indexing import ItemIndex, NumberIndexConfig, RandomIndexer
from llmrec.indexing.base import IndexData
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.prompts import IGNORE, TASKS
from llmrec.textid import TextIDDataset

SEQUENCE = "<user_{user}> has interacted with {history}"
N_USERS, N_ITEMS = 4, 25


@pytest.fixture(scope="module")
def generator() -> tuple[ItemIndex, CLLM4Rec]:
    return tiny_generator(N_USERS, N_ITEMS)


@pytest.fixture(scope="module")
def index(generator) -> ItemIndex:
    return generator[0]


@pytest.fixture(scope="module")
def model(generator) -> CLLM4Rec:
    return generator[1]


def prompts(model: CLLM4Rec, history: str, max_tokens: int = 512) -> SemanticPrompts:
    return SemanticPrompts(
        model.vocab, model.tokenizer, SEQUENCE, max_tokens, index=model.item_index, history=history
    )


@pytest.mark.parametrize("history", ["codes", "codes_item"])
def test_one_forward_loss_equals_the_sum_of_per_prefix_losses(model, history):
    written = prompts(model, history)
    items = [3, 9, 4, 7, 1, 11]
    example = SemanticSequenceDataset([items], written, windows=False)[0]
    assert example["task"] == TASKS.index("semantic_sequence")
    with torch.no_grad():
        full, count = model.semantic_loss(collate([example]))
    codes = model.item_index.token_ids(model.vocab)
    first = model.vocab.family_range("semantic").start
    per_prefix = []
    for k, item in enumerate(items):
        target = [int(t) for t in codes[item] if t >= 0]
        input_ids, labels = lm_example(written.encode(0, items[:k]), target, [t - first for t in target])
        batch = collate([{"task": TASKS.index("semantic"), "input_ids": input_ids, "labels": labels}])
        with torch.no_grad():
            per_prefix.append(model.semantic_loss(batch))
    assert int(count) == sum(int(n) for _, n in per_prefix) == codes.shape[1] * len(items)
    assert float(full) == pytest.approx(sum(float(loss) for loss, _ in per_prefix), rel=1e-4)
    # the loss is on code tokens only: the item tokens of "codes_item" carry none
    labelled = {example["input_ids"][t + 1] for t, label in enumerate(example["labels"]) if label != IGNORE}
    assert all(token in model.vocab.family_range("semantic") for token in labelled)
    assert (model.vocab.item_token(3) in example["input_ids"]) == (history == "codes_item")


@pytest.mark.parametrize("history", ["codes", "codes_item"])
def test_the_item_softmax_beside_the_codes_is_the_item_heads_loss_at_each_first_code(model, history):
    written = prompts(model, history, max_tokens=len(prompts(model, history).encode(0, [])) + 17)
    items = [3, 9, 4, 7, 1, 11]  # the window keeps the newest 4 (codes) or 3 (codes_item) items
    example = SemanticSequenceDataset([items], written, windows=False, item_targets=True)[0]
    kept = written.kept(0, items)
    at = [t for t, item in enumerate(example["item_labels"]) if item != IGNORE]
    assert [example["item_labels"][t] for t in at] == kept and len(kept) < len(items)
    level0 = model.vocab.level_range(0)
    assert all(
        example["input_ids"][t + 1] == written.codes[item][0] in level0
        for t, item in zip(at, kept, strict=True)
    )
    batch = collate([example])
    with torch.no_grad():
        codes_only, count = model.semantic_loss(batch)
        model.item_loss_weight = 0.5
        try:
            both, same_count = model.semantic_loss(batch)
        finally:
            model.item_loss_weight = 0.0
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], "collab")[0, at]
        logits = model.item_logits(hidden).float()  # the item head, as the sequential task scores it
        item_nll = torch.nn.functional.cross_entropy(logits, torch.tensor(kept), reduction="sum")
    assert int(same_count) == int(count)
    assert float(both) == pytest.approx(float(codes_only) + 0.5 * float(item_nll), rel=1e-4)
    without = SemanticSequenceDataset([items], written, windows=False)[0]
    assert "item_labels" not in without and without["labels"] == example["labels"]


def test_long_histories_are_cut_into_windows_that_cover_every_item(model):
    fixed = len(prompts(model, "codes_item").encode(0, []))
    written = prompts(model, "codes_item", max_tokens=fixed + 9)  # 4 tokens per item: 2 items a window
    items = list(range(11))
    dataset = SemanticSequenceDataset([items], written, windows=True)
    assert len(dataset) == 6
    covered = []
    for row in range(len(dataset)):
        example = dataset[row]
        assert len(example["input_ids"]) <= fixed + 9
        kept = written.kept(0, dataset.histories[row])
        assert kept == dataset.histories[row][-len(kept) :]
        covered = kept + covered
    assert covered == items  # newest window first, each interaction a target once


def test_beam_search_scores_equal_teacher_forcing_on_the_semantic_prompt(model):
    written = prompts(model, "codes_item")
    histories = [[1, 2, 3], [5, 6], [7], [8, 9, 10, 12]]
    scorer = GenerativeScorer(model, written, histories, beam=N_ITEMS)
    items, scores = scorer.recommend([0, 3])
    codes = model.item_index.token_ids(model.vocab)
    first = model.vocab.family_range("semantic").start
    for row, user in enumerate([0, 3]):
        best = int(items[row, 0])
        target = [int(t) for t in codes[best] if t >= 0]
        input_ids, labels = lm_example(
            written.encode(user, histories[user]), target, [t - first for t in target]
        )
        batch = collate([{"task": TASKS.index("semantic"), "input_ids": input_ids, "labels": labels}])
        with torch.no_grad():
            nll, _ = model.semantic_loss(batch)
        assert float(scores[row, 0]) == pytest.approx(-float(nll), abs=1e-4)


@pytest.mark.parametrize("beam", [5, 12])
def test_batched_beam_search_equals_one_user_at_a_time_and_transformers_generate(model, beam):
    written = prompts(model, "codes")
    histories = [[1, 2, 3], [5, 6], [7], [8, 9, 10, 12]]
    exclude = sp.csr_matrix(
        (np.ones(9), ([0, 0, 0, 1, 1, 2, 3, 3, 3], [1, 2, 3, 5, 6, 7, 8, 9, 10])), shape=(N_USERS, N_ITEMS)
    )
    users = np.arange(N_USERS)
    batched = GenerativeScorer(model, written, histories, exclude, beam=beam, batch_size=4).recommend(users)
    single = GenerativeScorer(model, written, histories, exclude, beam=beam, batch_size=1).recommend(users)
    reference = generate_reference(
        model, [written.encode(u, histories[u]) for u in users], beam, [exclude[u].indices for u in users]
    )
    assert torch.equal(batched[0], single[0]) and torch.allclose(batched[1], single[1], atol=1e-5)
    assert torch.equal(batched[0], reference[0])
    assert torch.allclose(batched[1], reference[1], atol=1e-4)
    for row in batched[0].tolist():  # real, unseen, distinct items only
        assert min(row) >= 0 and len(set(row)) == beam
    assert not any(set(batched[0][u].tolist()) & set(exclude[u].indices) for u in users)


# ---------------------------------------------------------------- LC-Rec text-ID tasks
def test_text_id_rows_pair_titles_and_codes_the_same_way_every_epoch(model):
    titles = [f"Movie {i} ({1990 + i})" for i in range(N_ITEMS)]
    histories = [[3, 9, 4, 7, 1, 11], [5], [2, 8, 6], []]
    dataset = TextIDDataset(titles, histories, model.vocab, model.tokenizer, model.item_index, 4, seed=1)
    codes = model.item_index.token_ids(model.vocab)
    first = model.vocab.family_range("semantic").start
    words = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert len(dataset) == 12
    targets_by_epoch = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        rows = [dataset[i] for i in range(len(dataset))]
        assert rows == [dataset[i] for i in range(len(dataset))]  # deterministic within an epoch
        assert [row["task"] for row in rows] == [dataset.task(i) for i in range(12)]
        assert [TASKS[row["task"]] for row in rows] == ["semantic"] * 4 + ["semantic_title"] * 4 + [
            "semantic"
        ] * 4
        targets = []
        for row in rows:
            labelled = [label for label in row["labels"] if label != IGNORE]
            if TASKS[row["task"]] == "semantic":  # the target is one item's codes, at the end
                item = next(i for i in range(N_ITEMS) if [first + c for c in labelled] == codes[i].tolist())
                assert row["input_ids"][-len(labelled) :] == codes[item].tolist()
            else:  # the title follows the item's codes
                item = next(i for i in range(N_ITEMS) if labelled == words(f' "{titles[i]}"'))
                assert codes[item].tolist() == [t for t in row["input_ids"] if t >= first]
            targets.append(item)
        quoted = [words(f' "{title}"') for title in titles]
        for row, item in zip(rows[:4], targets[:4], strict=True):  # title -> its own codes
            start = len(words("The item"))
            assert row["input_ids"][start : start + len(quoted[item])] == quoted[item]
        for row, item in zip(rows[8:], targets[8:], strict=True):  # the titles of the items before it
            user = next(u for u in range(N_USERS) if model.vocab.user_token(u) in row["input_ids"])
            before = histories[user][: histories[user].index(item)]
            assert before and len(row["input_ids"]) <= dataset.max_tokens
            prompt = row["input_ids"][: -3 - len(words(" and next"))]  # without the 3 codes and " and next"
            assert prompt[-len(quoted[before[-1]]) :] == quoted[before[-1]]
        targets_by_epoch.append(targets)
    assert targets_by_epoch[0] != targets_by_epoch[1]  # a fresh draw every epoch
    for kind in range(3):  # every kind trains: finite losses on the labelled tokens only
        batch = collate([dataset[kind * 4], dataset[kind * 4 + 1]])
        lm_sum, lm_count, _, _ = model(batch)
        assert torch.isfinite(lm_sum) and int(lm_count) == int((batch["labels"] != IGNORE).sum())


def test_the_text_id_weight_mixes_that_many_rows_into_the_semantic_sequence_task(ml100k_bundle):
    from data_prep import load_bundle
    from llmrec.collate import TaskMixture
    from llmrec.pipeline import finetune_dataset

    bundle = load_bundle(ml100k_bundle)
    index = RandomIndexer(NumberIndexConfig(codebook_size=12)).build(IndexData(n_items=bundle.n_items))
    built = CLLM4Rec.from_config(
        ModelConfig(lora_r=4, max_doc_tokens=64), BackboneConfig("tiny-llama"), bundle.n_users, bundle.n_items,
        item_index=index,
    )  # fmt: skip
    mixed = finetune_dataset(
        bundle, built, 0, task="semantic_sequence", with_content=False, text_id_weight=0.3
    )
    assert isinstance(mixed, TaskMixture)
    main, extra = mixed.parts
    assert isinstance(extra, TextIDDataset) and len(extra) == 3 * round(0.3 * len(main) / 3)
    with pytest.raises(ValueError, match="text_id_weight"):
        finetune_dataset(bundle, built, 0, task="sequential", with_content=False, text_id_weight=0.3)


def test_the_item_softmax_beside_the_codes_needs_the_semantic_sequence_task():
    finetune = recipe_main("finetune")
    with pytest.raises(ConfigError, match=r"item_loss_weight.*needs --task semantic_sequence"):
        finetune(["--item_loss_weight", "1", "--task", "sequential"])
    with pytest.raises(ConfigError, match=r"item_loss_weight.*must be >= 0"):
        finetune(["--item_loss_weight", "-1", "--task", "semantic_sequence"])
