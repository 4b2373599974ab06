"""Next-item training of the LLM on tiny backbones: the sequential item-head task, the next-item semantic
task, and DPO alignment of the item head (loss values, recipes end to end, kill and resume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from conftest import recipe_main
from safetensors.torch import load_file

from common.config import ConfigError
from data_prep import load_bundle
from llmrec.backbone import BackboneConfig
from llmrec.collate import SequenceDataset, collate
from llmrec.export import export_run
from llmrec.generate import GenerativeScorer, NextSemanticDataset
from llmrec.indexing import NumberIndexConfig, RandomIndexer
from llmrec.indexing.base import IndexData
from llmrec.losses import ItemSoftmax
from llmrec.metrics import evaluate_scorer
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.pipeline import prompt_template, scorer_for
from llmrec.prompts import IGNORE, TASKS, FinetunePrompts
from llmrec.recommender import Recommender
from llmrec.run import run_model, run_model_dir
from llmrec.scoring import PrecomputedScorer

REPO = Path(__file__).resolve().parents[1]
SEQUENCE = "<user_{user}> has interacted with {history}"
N_USERS, N_ITEMS = 4, 25
TINY = ["--name_or_path", "tiny-llama", "--lora_r", "4", "--max_doc_tokens", "32", "--batch_size", "16"]


@pytest.fixture(scope="module")
def model() -> CLLM4Rec:
    built = CLLM4Rec.from_config(
        ModelConfig(lora_r=4, head="untied"), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS, seed=0
    )
    with torch.no_grad():  # a non-zero bias, so that the test covers the untied head's whole score
        built.head.bias.copy_(torch.linspace(-1, 1, N_ITEMS))
    return built.eval()


@pytest.fixture(scope="module")
def loo_bundle(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ML-100K on the fixed leave-one-out split (~2 s)."""
    from data_prep.build import build_ml100k_reference

    return build_ml100k_reference(
        shared_dir, tmp_path_factory.mktemp("bundles") / "ml-100k-loo", "ml-100k-loo"
    )


def prompts_of(model: CLLM4Rec, max_tokens: int = 512) -> FinetunePrompts:
    return FinetunePrompts(model.vocab, model.tokenizer, SEQUENCE, max_tokens=max_tokens)


def test_sequential_losses_at_every_position_equal_separate_one_prefix_forwards(model):
    histories = [[3, 9, 4, 7, 1], [], [12, 5]]
    dataset = SequenceDataset(histories, prompts_of(model))
    assert dataset.users == [0, 2]
    batch = collate([dataset[0], dataset[1]])  # right-padded: user 2's row is shorter
    labels = batch["labels"]
    assert (labels != IGNORE).sum(dim=1).tolist() == [
        5,
        2,
    ]  # one label per item, the first from the bare prompt
    softmax = ItemSoftmax()
    with torch.no_grad():
        total, count = model.sequential_loss(batch, softmax)
        assert int(count) == 7
        separate = 0.0
        for row, user in enumerate([0, 2]):
            for position in (labels[row] != IGNORE).nonzero()[:, 0].tolist():
                only = dict(batch, labels=torch.full_like(labels, IGNORE))
                only["labels"][row, position] = labels[row, position]
                one_position, _ = model.sequential_loss(only, softmax)
                k = int((labels[row, : position + 1] != IGNORE).sum()) - 1  # the prefix holds k items
                prompt = torch.tensor([prompts_of(model).encode(user, histories[user][:k])])
                scores = model.score_items(prompt, torch.ones_like(prompt))
                expected = -F.log_softmax(scores, dim=-1)[0, histories[user][k]]
                torch.testing.assert_close(one_position, expected, rtol=1e-4, atol=1e-5)
                separate += float(expected)
    assert float(total) == pytest.approx(separate, rel=1e-4)


def test_pooled_history_at_every_position_equals_the_one_prefix_prompt_with_its_whole_history():
    """history_pool=mean: position t's bag holds the items up to t only (causal), also those a long
    prompt left out, so each loss equals scoring the one-prefix prompt with the prefix as its history."""
    pooled = CLLM4Rec.from_config(
        ModelConfig(lora_r=4, history_pool="mean"), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS, seed=0
    ).eval()
    with torch.no_grad():
        pooled.head.pool_scale.fill_(2.5)  # the pooled path weighs as much as the decoder's state
    # item 3 left out and in the prompt, item 20 twice in the prompt: each counted once
    histories = [[3, 9, 4, 7, 1, 5, 20, 11, 3, 2, 20, 14], [12, 5]]
    prompts = prompts_of(pooled, max_tokens=27)  # keeps the newest 6 of user 0's items
    dataset = SequenceDataset(histories, prompts)
    batch = collate([dataset[0], dataset[1]])
    starts = [len(h) - len(prompts.kept(user, h)) for user, h in enumerate(histories)]
    assert starts == [6, 0] and batch["older"][0].tolist() == histories[0][:6]
    labels, softmax = batch["labels"], ItemSoftmax()
    with torch.no_grad():
        total, count = pooled.sequential_loss(batch, softmax)
        without = CLLM4Rec.sequential_loss(pooled, dict(batch, older=batch["older"][:, :0]), softmax)[0]
        separate = 0.0
        for row, user in enumerate([0, 1]):
            start = starts[row]
            for position in (labels[row] != IGNORE).nonzero()[:, 0].tolist():
                k = start + int((labels[row, : position + 1] != IGNORE).sum()) - 1
                prompt = torch.tensor([prompts_of(pooled).encode(user, histories[user][start:k])])
                history = torch.tensor([histories[user][:k] or [-1]])
                scores = pooled.score_items(prompt, torch.ones_like(prompt), history)
                separate += float(-F.log_softmax(scores, dim=-1)[0, histories[user][k]])
    assert int(count) == 6 + 2
    assert float(total) == pytest.approx(separate, rel=1e-4)
    assert float(without) != pytest.approx(separate, rel=1e-3)  # the left-out items do count


def test_sequence_examples_keep_the_most_recent_items():
    built = CLLM4Rec.from_config(ModelConfig(lora_r=4), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS)
    prompts = prompts_of(built, max_tokens=40)
    example = SequenceDataset([list(range(24))], prompts)[0]
    items = built.vocab.family_range("item")
    kept = [t - items.start for t in example["input_ids"] if t in items]
    assert len(example["input_ids"]) <= 40 and kept == list(range(24))[-len(kept) :] and len(kept) < 24
    assert example["task"] == TASKS.index("sequential")


def test_next_semantic_examples_target_the_item_after_a_chronological_prefix():
    index = RandomIndexer(NumberIndexConfig(codebook_size=4, seed=1)).build(IndexData(n_items=N_ITEMS))
    built = CLLM4Rec.from_config(
        ModelConfig(lora_r=4), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS, item_index=index
    )
    history = [3, 9, 4, 7, 1, 11]
    dataset = NextSemanticDataset([history], prompts_of(built), index, seed=0)
    cuts = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        kept, target = dataset.split(0)
        assert list(kept) + list(target) == history[: len(kept) + 1] and len(target) == 1
        cuts.add(len(kept))
        example = dataset[0]
        first = built.vocab.family_range("semantic").start
        codes = [label for label in example["labels"] if label != IGNORE]
        assert [first + c for c in codes] == [
            int(t) for t in index.token_ids(built.vocab)[target[0]] if t >= 0
        ]
    assert len(cuts) > 3  # the cut moves between epochs


def align_args(bundle: Path, init: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(bundle), "--init", str(init), "--output_dir", str(out), "--pairs_per_user", "1",
        "--n_rejected", "4", "--batch_size", "16", "--max_steps", "6", "--save_steps", "2", "--log_steps", "1",
        "--warmup_ratio", "0", "--eval_batch_size", "256", *extra,
    ]  # fmt: skip


def test_sequential_finetune_then_alignment_run_end_to_end_and_resume_after_a_kill(
    loo_bundle, tmp_path, kill_after_checkpoint
):
    finetune, evaluate, align = (recipe_main(name) for name in ("finetune", "evaluate", "align"))
    sft = tmp_path / "sft"
    finetune(
        ["--data", str(loo_bundle), "--output_dir", str(sft), *TINY, "--task", "sequential"]
        + ["--with_content", "false", "--max_steps", "3", "--eval_batch_size", "256"]
    )
    assert any("loss/sequential" in line for line in (sft / "metrics.jsonl").read_text().splitlines())
    metrics = evaluate(["--run", str(sft), "--split", "test", "--batch_size", "256"])
    assert metrics["users"] == 943 and {"hr@10", "ndcg@10", "hr@20"} <= set(metrics)
    with pytest.raises(ConfigError, match="has no prior"):
        evaluate(["--run", str(sft), "--prior_weight", "0"])

    # the export serves known users the chronological prompt the run trained on, with its scores
    bundle = load_bundle(loo_bundle)
    exported = export_run(sft, tmp_path / "bundle", mapper=False)
    assert json.loads((exported / "config.json").read_text())["templates"]["user"] == prompt_template(
        bundle, "sequence"
    )
    model = CLLM4Rec.from_pretrained(run_model_dir(sft))
    expected = scorer_for(bundle, model, 256, split="valid", prompt="sequence").score(np.arange(3))
    served = Recommender.from_pretrained(exported, device="cpu").score_batch(bundle.user_ids[:3])
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)

    reference = tmp_path / "aligned"
    with pytest.raises(ConfigError, match="has no prior to blend"):  # refused before anything is written
        align([*align_args(loo_bundle, sft, reference), "--prior_weight", "choose"])
    assert not reference.exists()
    align(align_args(loo_bundle, sft, reference))
    losses = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/preference" in row for row in losses) and any("eval/ndcg@10" in row for row in losses)
    assert json.loads((reference / "run_config.json").read_text())["task"] == "sequential"
    for loss in ("sdpo", "grpo"):  # the other losses through the same recipe and loop
        out = tmp_path / loss
        align([*align_args(loo_bundle, sft, out, "--loss", loss, "--n_random", "2"), "--max_steps", "2"])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any(np.isfinite(row.get("loss/preference", np.nan)) for row in rows), loss
        assert any("eval/ndcg@10" in row for row in rows), loss

    killed = tmp_path / "killed"
    align_command = [str(REPO / "recipes" / "align.py"), *align_args(loo_bundle, sft, killed)]
    kill_after_checkpoint(align_command, killed, "checkpoint_4")
    assert not (killed / "model").exists()
    align(align_args(loo_bundle, sft, killed, "--resume", "true"))
    expected = load_file(reference / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = load_file(sft / "model" / "model.safetensors")
    assert any(not torch.equal(moved[name], expected[name]) for name in expected)  # DPO changed the weights


def test_sequential_run_with_a_prior_chooses_its_weight_on_the_sequence_prompt(loo_bundle, tmp_path):
    """The blend weight is chosen on the prompt the run trained on: at weight 0 the grid's score is the
    item head's own on that prompt (it once used the masked prompt, which a sequential head never saw)."""
    run = tmp_path / "run"
    recipe_main("finetune")(
        ["--data", str(loo_bundle), "--output_dir", str(run), *TINY, "--task", "sequential"]
        + ["--with_content", "false", "--max_steps", "2", "--eval_batch_size", "256"]
        + ["--history_pool", "mean", "--prior", "ease"]
    )
    grid = json.loads((run / "prior_weight.json").read_text())["valid"]["ndcg@10"]
    model = run_model(run)
    bundle = load_bundle(loo_bundle)
    logits, _ = scorer_for(bundle, model, 256, prompt="sequence").parts(np.arange(bundle.n_users))
    lm_only = evaluate_scorer(
        PrecomputedScorer(logits, np.arange(bundle.n_users)), bundle, "valid", progress=False
    )
    assert grid["0.0"] == pytest.approx(lm_only["ndcg@10"])
    # evaluate --prior_weight 0 reports the LM alone, beside the blend finetuning chose
    alone = recipe_main("evaluate")(["--run", str(run), "--split", "valid", "--prior_weight", "0"])
    assert alone["ndcg@10"] == pytest.approx(lm_only["ndcg@10"])
    assert "valid/prior_weight=0" in json.loads((run / "metrics.json").read_text())["metrics"]

    # alignment keeps the SFT run's weight, or chooses it again on valid for the aligned model
    for choice in ("keep", "choose"):
        aligned = tmp_path / choice
        recipe_main("align")(
            [*align_args(loo_bundle, run, aligned, "--loss", "sdpo"), "--max_steps", "2"]
            + ["--prior_weight", choice]
        )
        model = run_model(aligned)
        if choice == "keep":
            assert not (aligned / "prior_weight.json").exists()
            assert model.head.blend_weight == run_model(run).head.blend_weight
            continue
        record = json.loads((aligned / "prior_weight.json").read_text())
        grid = {float(w): v for w, v in record["valid"]["ndcg@10"].items()}
        assert record["prior_weight"] == max(grid, key=grid.get) == model.head.blend_weight
        logits, _ = scorer_for(bundle, model, 256, prompt="sequence").parts(np.arange(bundle.n_users))
        lm_only = evaluate_scorer(
            PrecomputedScorer(logits, np.arange(bundle.n_users)), bundle, "valid", progress=False
        )
        assert grid[0.0] == pytest.approx(lm_only["ndcg@10"])  # scored on the aligned model


def test_validity_diagnostics_with_and_without_the_trie():
    # 25 items on 3 levels of 4 codes: 64 tuples, 39 of which name no item
    index = RandomIndexer(NumberIndexConfig(codebook_size=4, seed=1)).build(IndexData(n_items=N_ITEMS))
    assert index.codebook_sizes == (4, 4, 4)
    built = CLLM4Rec.from_config(
        ModelConfig(lora_r=4), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS, item_index=index, seed=0
    ).eval()
    histories = [[1, 2], [5, 6, 7], [3], [4, 8]]
    exclude = sp.csr_matrix(
        (np.ones(8, np.float32), ([0, 0, 1, 1, 1, 2, 3, 3], [1, 2, 5, 6, 7, 3, 4, 8])), shape=(4, 25)
    )
    scorer = GenerativeScorer(built, prompts_of(built), histories, exclude, beam=64, batch_size=2)
    out = scorer.diagnostics(np.arange(4))
    assert out["invalid_rate"] == 0.0 and out["duplicate_rate"] == 0.0
    # a 64-wide free beam returns every tuple: exactly the share of tuples that name no item
    assert out["invalid_rate_free"] == pytest.approx(39 / 64)
    assert out["seen_rate_free"] == pytest.approx(np.mean([2, 3, 1, 2]) / 64)
    assert out["duplicate_rate_free"] == 0.0 and out["collision_rate"] == 0.0
    assert [out[f"codebook_usage@{level}"] for level in range(3)] == pytest.approx(
        [len(set(index.codes[:, level])) / 4 for level in range(3)]
    )


def test_embedding_dropout_drops_id_token_embeddings_only_while_training():
    built = CLLM4Rec.from_config(
        ModelConfig(lora_r=4, lora_dropout=0.0, embedding_dropout=0.5),
        BackboneConfig("tiny-llama"),
        N_USERS,
        N_ITEMS,
        seed=0,
    )
    words = built.tokenizer("has interacted with", add_special_tokens=False)["input_ids"]
    items = [built.vocab.family_range("item").start + i for i in (3, 9, 4)]
    ids = torch.tensor([words + items])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        built.eval()
        first, second = (built.hidden_states(ids, mask, "collab") for _ in range(2))
        torch.testing.assert_close(first, second)  # off at evaluation
        built.train()
        torch.manual_seed(0)
        dropped = built.hidden_states(ids, mask, "collab")
    n = len(words)  # causal: the word positions before the first ID token see no dropped embedding
    torch.testing.assert_close(dropped[0, :n], first[0, :n], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dropped[0, n:], first[0, n:], atol=1e-3)


def test_sequence_windows_make_every_training_item_a_target_once():
    built = CLLM4Rec.from_config(ModelConfig(lora_r=4), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS)
    prompts = prompts_of(built, max_tokens=27)  # 6 items per prompt
    histories = [list(range(20)), [12, 5], []]
    newest = SequenceDataset(histories, prompts)
    windowed = SequenceDataset(histories, prompts, windows=True)
    assert newest.users == [0, 1] and windowed.users == [0, 0, 0, 0, 1]
    targets = {0: [], 1: []}
    for index, user in enumerate(windowed.users):
        example = windowed[index]
        targets[user] += [label for label in example["labels"] if label != IGNORE]
        kept = len(example["older"])  # the window starts where its older items end
        assert windowed.histories[index][:kept] == example["older"]
    assert sorted(targets[0]) == list(range(20)) and sorted(targets[1]) == [5, 12]
    assert [label for label in newest[0]["labels"] if label != IGNORE] == list(range(14, 20))
