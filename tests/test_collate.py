"""Soft+hard prompt batching: label alignment, per-epoch reshuffling and masking, task-pure length buckets."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec.backbone import byte_level_tokenizer
from llmrec.collate import (
    FinetuneDataset,
    PretrainDataset,
    TaskBucketSampler,
    TaskMixture,
    collate,
    lm_example,
)
from llmrec.prompts import IGNORE, TASKS, FinetunePrompts
from llmrec.tokens import RecVocab

TEMPLATE = "<user_{user}> has interacted with {history}, <user_{user}> will interact with"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return RecVocab(base_size=len(tokenizer), n_users=5, n_items=20)


def test_lm_example_labels_each_position_with_the_next_main_token():
    input_ids, labels = lm_example([1, 2, 3], [10, 11], [0, 1])
    assert input_ids == [1, 2, 3, 10, 11]
    # position 2 (last prompt token) predicts main token 0, position 3 predicts main token 1, nothing after
    assert labels == [IGNORE, IGNORE, 0, 1, IGNORE]


def test_collaborative_documents_reshuffle_each_epoch_and_label_items_by_index(vocab, tokenizer):
    items = list(range(12))
    row = {
        "kind": "collaborative",
        "prompt": "<user_3> has interacted with",
        "main": " ".join(f"<item_{i}>" for i in items),
    }
    dataset = PretrainDataset([row], vocab, tokenizer, seed=7)
    first = dataset[0]
    prompt_len = len(vocab.encode(row["prompt"], tokenizer))
    main_labels = first["labels"][prompt_len - 1 : -1]
    assert sorted(main_labels) == items
    assert first["input_ids"][prompt_len:] == [vocab.item_token(i) for i in main_labels]
    assert dataset[0] == first  # same epoch, same order
    dataset.set_epoch(1)
    assert dataset[0]["labels"] != first["labels"]


def test_content_documents_are_scored_on_words_only(vocab, tokenizer):
    row = {"kind": "item", "prompt": "<item_4> is described as:", "main": "Heat (1995)"}
    example = PretrainDataset([row], vocab, tokenizer)[0]
    prompt_len = len(vocab.encode(row["prompt"], tokenizer))
    assert example["task"] == TASKS.index("content")
    assert (
        example["labels"][prompt_len - 1 : -1]
        == tokenizer(" Heat (1995)", add_special_tokens=False)["input_ids"]
    )
    assert all(label < vocab.base_size for label in example["labels"])


def test_masked_history_keeps_one_in_and_one_out_and_redraws_per_epoch(vocab, tokenizer):
    histories = [[1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [5], []]
    dataset = FinetuneDataset(histories, FinetunePrompts(vocab, tokenizer, TEMPLATE), seed=3, mask_ratio=0.2)
    assert dataset.users == [0, 1, 2]  # users without training items give no example
    draws = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for index, user in enumerate(dataset.users):
            kept, masked = dataset.split(index)
            assert sorted([*kept, *masked]) == sorted(histories[user])
            if len(histories[user]) >= 2:
                assert len(kept) >= 1 and len(masked) >= 1
        draws.append(tuple(dataset.split(1)[0]))
        example = dataset[1]
        assert sorted(example["targets"]) == histories[1]  # target: all training items
    assert len(set(draws)) > 1
    kept, _ = dataset.split(1)
    assert len(kept) == 8  # round(10 * 0.8)


def test_masked_target_mode_targets_only_held_out_items(vocab, tokenizer):
    dataset = FinetuneDataset(
        [[3, 4, 5, 6, 7]], FinetunePrompts(vocab, tokenizer, TEMPLATE), seed=0, target="masked"
    )
    _, masked = dataset.split(0)
    assert sorted(dataset[0]["targets"]) == sorted(masked.tolist())


def test_prompt_truncation_keeps_the_most_recent_items(vocab, tokenizer):
    prompts = FinetunePrompts(vocab, tokenizer, TEMPLATE, max_tokens=60)
    ids = prompts.encode(1, list(range(20)))
    assert len(ids) <= 60
    items = [
        t - vocab.item_token(0) for t in ids if vocab.item_token(0) <= t < vocab.item_token(0) + vocab.n_items
    ]
    assert items == list(range(20 - len(items), 20))


def test_bucket_sampler_gives_task_pure_batches_deterministically(vocab, tokenizer):
    rows = [
        {"kind": "collaborative", "prompt": f"<user_{u}> has interacted with", "main": "<item_1> <item_2>"}
        for u in range(5)
    ] + [{"kind": "item", "prompt": f"<item_{i}> is described as:", "main": "x" * (i + 1)} for i in range(11)]
    mixture = TaskMixture(
        PretrainDataset(rows[:5], vocab, tokenizer), PretrainDataset(rows[5:], vocab, tokenizer)
    )
    sampler = TaskBucketSampler(mixture, batch_size=4, seed=1)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(16))
    assert all(len({mixture.task(i) for i in batch}) == 1 for batch in batches)
    assert list(TaskBucketSampler(mixture, batch_size=4, seed=1)) == batches
    assert len(sampler) == len(batches)
    assert len(TaskBucketSampler(mixture, batch_size=3, pool_batches=2)) == len(
        list(TaskBucketSampler(mixture, 3, pool_batches=2))
    )
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_collate_pads_right_and_masks(vocab, tokenizer):
    batch = collate(
        [
            {"task": 0, "input_ids": [5, 6, 7], "labels": [IGNORE, 1, IGNORE]},
            {"task": 0, "input_ids": [5], "labels": [IGNORE]},
        ],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 1, IGNORE], [IGNORE, IGNORE, IGNORE]]
    assert np.array_equal(batch["task"].numpy(), [0, 0])
