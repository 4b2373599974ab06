"""The item head's history paths: the pooled bag of items, the blended collaborative prior, prompt order."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_recommender import FRESH_PROCESS, REPO, data, recipe  # noqa: F401  (data is a fixture)

from common.io import sha256_file
from data_prep import load_bundle
from llmrec.backbone import BackboneConfig
from llmrec.collate import FinetuneDataset, collate
from llmrec.export import export_run
from llmrec.head import standardize
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.pipeline import PRIOR_WEIGHTS, scorer_for
from llmrec.prompts import FinetunePrompts
from llmrec.recommender import Recommender
from llmrec.run import run_model, run_model_dir

N_USERS, N_ITEMS = 5, 20


def tiny(**overrides) -> CLLM4Rec:
    return CLLM4Rec.from_config(
        ModelConfig(lora_r=4, max_doc_tokens=32, **overrides), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS
    )


def prompts_batch(model: CLLM4Rec, histories: list[list[int]], max_tokens: int = 64) -> dict:
    prompts = FinetunePrompts(model.vocab, model.tokenizer, "<user_{user}> saw {history}, next", max_tokens)
    return collate(
        [
            {"task": 2, "input_ids": prompts.encode(u, h), "history": h, "targets": h, "user": u}
            for u, h in enumerate(histories)
        ]
    )


HISTORIES = [[1, 4, 7], [2, 3], [0, 5, 6, 9, 11], [19], [8, 8, 12]]


def test_history_bag_from_the_prompt_equals_the_given_history():
    model = tiny(history_pool="mean")
    batch = prompts_batch(model, HISTORIES)
    from_prompt = model.history_bag(batch["input_ids"], batch["attention_mask"])
    given = model.history_bag(batch["input_ids"], batch["attention_mask"], batch["history"])
    expected = torch.zeros(len(HISTORIES), N_ITEMS)
    for row, items in enumerate(HISTORIES):
        expected[row, items] = 1.0
    assert torch.equal(from_prompt, expected) and torch.equal(given, expected)
    # a prompt cut short loses its oldest items; the history given beside it does not
    short = prompts_batch(model, HISTORIES, max_tokens=6)
    cut = model.history_bag(short["input_ids"], short["attention_mask"])
    assert cut.sum() < expected.sum()
    assert torch.equal(
        model.history_bag(short["input_ids"], short["attention_mask"], short["history"]), expected
    )


def test_pooled_history_changes_scores_and_trains_its_scale():
    plain, pooled = tiny(), tiny(history_pool="mean")
    batch = prompts_batch(pooled, HISTORIES)
    args = (batch["input_ids"], batch["attention_mask"], batch["history"])
    with torch.no_grad():
        pooled.collab.family_weight("item").normal_(std=1.0)
        plain.collab.family_weight("item").copy_(pooled.collab.family_weight("item"))
        table = pooled.collab.family_weight("item")
        bag = pooled.history_bag(*args)
        mean = (bag @ table) / bag.sum(1, keepdim=True)
        mean = mean / mean.pow(2).mean(1, keepdim=True).sqrt()
        expected = (plain.last_hidden(*args) + mean) @ table.T
    assert torch.allclose(pooled.score_items(*args), expected, atol=1e-5)
    assert not torch.allclose(plain.score_items(*args), expected, atol=1e-3)
    pooled.train()
    loss, count = pooled.finetune_loss(batch, pooled.item_softmax)
    loss.backward()
    assert (
        count == len(HISTORIES)
        and pooled.head.pool_scale.grad is not None
        and pooled.head.pool_scale.grad != 0
    )


def test_prior_blend_is_its_definition_and_survives_save_and_load(tmp_path):
    model = tiny(prior="ease", prior_weight=0.7)
    matrix = torch.randn(N_ITEMS, N_ITEMS, generator=torch.Generator().manual_seed(0))
    model.head.fit_prior(matrix)
    batch = prompts_batch(model, HISTORIES)
    args = (batch["input_ids"], batch["attention_mask"], batch["history"])
    with torch.no_grad():
        logits = model.item_logits(model.last_hidden(*args)).float()
        prior = model.history_bag(*args) @ matrix
        z = (logits - logits.mean(1, keepdim=True)) / logits.std(1, keepdim=True)
        expected = z + 0.7 * (prior - prior.mean(1, keepdim=True)) / prior.std(1, keepdim=True)
        scores = model.score_items(*args)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert torch.allclose(standardize(logits), z, atol=1e-6)
    model.save_pretrained(tmp_path / "m")
    again = CLLM4Rec.from_pretrained(tmp_path / "m")
    assert again.head.blend_weight == 0.7 and torch.equal(again.head.prior.matrix, matrix)
    # the blend weight is state saved with the weights: a changed one survives too, the config stays
    model.head.set_prior_weight(0.15)
    model.save_pretrained(tmp_path / "m2")
    changed = CLLM4Rec.from_pretrained(tmp_path / "m2")
    assert changed.head.blend_weight == 0.15 and changed.config.prior_weight == 0.7
    with torch.no_grad():
        assert not torch.allclose(changed.score_items(*args), scores, atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(again.score_items(*args), scores, atol=1e-6)


def test_chronological_prompts_keep_order_and_draw_the_same_items():
    model = tiny()
    prompts = FinetunePrompts(model.vocab, model.tokenizer, "<user_{user}> saw {history}, next", 64)
    history = [[3, 9, 1, 14, 7, 0, 11, 5, 2, 18]]
    shuffled = FinetuneDataset(history, prompts, seed=3, mask_ratio=0.5, target="masked")
    ordered = FinetuneDataset(
        history, prompts, seed=3, mask_ratio=0.5, target="masked", prompt_order="chronological"
    )
    for epoch in range(3):
        shuffled.set_epoch(epoch), ordered.set_epoch(epoch)
        (kept_s, masked_s), (kept_o, masked_o) = shuffled.split(0), ordered.split(0)
        assert sorted(kept_s) == sorted(kept_o) and list(masked_s) == list(masked_o)
        positions = [history[0].index(i) for i in kept_o]
        assert positions == sorted(positions)
        example = ordered[0]
        assert example["history"] == list(kept_o) and sorted(example["targets"]) == sorted(masked_o)


def test_prior_weight_is_chosen_on_valid_and_exported_scores_match_training_time(data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    argv = ["--data", str(data), "--name_or_path", "tiny-llama", "--lora_r", "4", "--output_dir", str(run)]
    flags = ["--history_pool", "mean", "--prior", "ease", "--target", "masked", "--mask_ratio", "0.5"]
    state = recipe("finetune")(
        [*argv, *flags, "--prompt_order", "chronological", "--max_steps", "3", "--batch_size", "8"]
    )
    # the weight is chosen once and recorded beside the model, whose directory is not rewritten
    record = json.loads((run / "prior_weight.json").read_text())
    assert record["prior_weight"] == state["prior_weight"] and state["prior_weight"] in PRIOR_WEIGHTS
    assert record["model_sha256"] == sha256_file(run_model_dir(run) / "model.safetensors")
    saved = CLLM4Rec.from_pretrained(run_model_dir(run))
    assert saved.config.prior_weight == 0.0 and saved.head.blend_weight == 0.0
    model = run_model(run)
    assert model.head.blend_weight == state["prior_weight"]
    b = load_bundle(data)
    expected = scorer_for(b, model).score(np.arange(b.n_users))

    bundle = export_run(run, tmp_path / "bundle")
    scores_file, lists_file = tmp_path / "scores.safetensors", tmp_path / "lists.json"
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(bundle), str(scores_file), str(lists_file)],
        check=True,
        cwd=REPO,
    )
    assert torch.allclose(load_file(str(scores_file))["scores"], expected, atol=1e-5, rtol=0)
    recommender = Recommender.from_pretrained(bundle, device="cpu")
    assert torch.allclose(recommender.score(b.user_ids[3]), expected[3], atol=1e-5, rtol=0)
    # the prior cannot be folded into a plain transformers model
    with pytest.raises(ValueError, match="merge"):
        export_run(run, tmp_path / "merged", merge=True)
