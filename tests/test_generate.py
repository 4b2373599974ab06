"""Generative semantic-ID recommendation: constrained beam search only yields real items, and is exact when wide.

The search logic is checked against an exhaustive search over random tries with a synthetic decoder
(fast, so hypothesis can try many tries); the cached LM decoding is checked against teacher-forced
scoring of every item through the training loss, on tiny random backbones.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrec.backbone import BackboneConfig
from llmrec.collate import collate, lm_example
from llmrec.generate import (
    GenerativeScorer,
    ModelDecoder,
    SemanticDataset,
    TrieTensors,
    constrained_beam_search,
)
from llmrec.indexing import ItemIndex, NumberIndexConfig, RandomIndexer
from llmrec.indexing.base import IndexData
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.prompts import IGNORE, TASKS, FinetunePrompts

TEMPLATE = "<user_{user}> has interacted with {history}, <user_{user}> will interact with"
N_USERS, N_ITEMS = 6, 25


# ---------------------------------------------------------------- search logic on random tries
def random_tree(rng: np.random.Generator, depth: int, size: int, max_fanout: int) -> list[tuple[int, ...]]:
    """Code tuples of a random prefix-free tree: each node is a leaf (an item) or has up to ``max_fanout`` children."""
    tuples, stack = [], [()]
    while stack:
        prefix = stack.pop()
        if prefix and (len(prefix) == depth or rng.random() < 0.3):
            tuples.append(prefix)
            continue
        for code in rng.choice(size, size=int(rng.integers(1, max_fanout + 1)), replace=False):
            stack.append((*prefix, int(code)))
    return tuples


@st.composite
def indexes(draw) -> ItemIndex:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    depth, size = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    shared = draw(st.booleans())
    if draw(st.booleans()):  # fixed length, like RQ-VAE / random / sequential indexes
        total = size**depth
        numbers = rng.choice(total, size=int(rng.integers(1, min(total, 40) + 1)), replace=False)
        codes = (numbers[:, None] // size ** np.arange(depth - 1, -1, -1)) % size
    else:  # variable length, like collaborative indexes
        tuples = random_tree(rng, depth, size, max_fanout=size)[:60]
        codes = np.full((len(tuples), depth), -1)
        for row, code in enumerate(tuples):
            codes[row, : len(code)] = code
        codes = codes[:, : max(len(code) for code in tuples)]
    sizes = (size,) if shared else (size,) * codes.shape[1]
    return ItemIndex(codes, sizes, method="test", shared_codebook=shared)


class HashDecoder:
    """Log-probabilities that depend only on (row, prefix): a stand-in LM whose exhaustive scores are known."""

    def __init__(self, index: ItemIndex, rows: int, seed: int):
        self.index, self.seed = index, seed
        self.prefixes: list[tuple[int, tuple[int, ...]]] = [(row, ()) for row in range(rows)]

    def log_probs(self, row: int, prefix: tuple[int, ...]) -> torch.Tensor:
        level = 0 if self.index.shared_codebook else len(prefix)
        gen = torch.Generator().manual_seed(hash((self.seed, row, prefix)) % 2**63)
        logits = torch.randn(self.index.codebook_sizes[level], generator=gen) * 3
        return torch.log_softmax(logits, dim=-1)

    def _stack(self) -> torch.Tensor:
        return torch.stack([self.log_probs(row, prefix) for row, prefix in self.prefixes])

    def start(self) -> torch.Tensor:
        return self._stack()

    def advance(self, parents: torch.Tensor, depth: int, codes: torch.Tensor) -> torch.Tensor:
        old = self.prefixes
        self.prefixes = [
            (old[p][0], (*old[p][1], int(c))) for p, c in zip(parents.tolist(), codes.tolist(), strict=True)
        ]
        return self._stack()

    def exhaustive(self, row: int) -> torch.Tensor:
        """Every item's score for ``row``: the sum of its codes' log-probabilities."""
        scores = torch.zeros(self.index.n_items)
        for item in range(self.index.n_items):
            code = self.index.code(item)
            scores[item] = sum(float(self.log_probs(row, code[:d])[code[d]]) for d in range(len(code)))
        return scores


@settings(max_examples=60, deadline=None)
@given(index=indexes(), beam=st.integers(1, 8), seed=st.integers(0, 1000), data=st.data())
def test_beam_search_yields_only_real_unexcluded_items(index, beam, seed, data):
    rows = 3
    rng = np.random.default_rng(seed)
    excluded = [
        rng.choice(index.n_items, size=int(rng.integers(0, index.n_items)), replace=False)
        for _ in range(rows)
    ]
    top_k = data.draw(st.integers(1, beam))
    trie = TrieTensors(index)
    decoder = HashDecoder(index, rows, seed)
    items, scores = constrained_beam_search(decoder, trie, beam, top_k, trie.remaining(excluded))
    valid = {index.code(i): i for i in range(index.n_items)}
    for row in range(rows):
        found = [int(i) for i in items[row] if i >= 0]
        assert all(i not in excluded[row] for i in found)
        assert len(set(found)) == len(found)
        assert all(valid[index.code(i)] == i for i in found)  # a real item with its own code tuple
        # a full list whenever enough items remain: the subtree counts never let a beam die out
        assert len(found) == min(top_k, index.n_items - len(excluded[row]))
        assert (items[row, len(found) :] == -1).all() and torch.isinf(scores[row, len(found) :]).all()
        # each score is the item's exact score, in descending order
        exact = decoder.exhaustive(row)
        assert torch.allclose(scores[row, : len(found)], exact[found], atol=1e-4)
        assert (scores[row, :-1] >= scores[row, 1:]).all()


@settings(max_examples=40, deadline=None)
@given(index=indexes(), seed=st.integers(0, 1000))
def test_a_beam_as_wide_as_the_catalogue_is_exhaustive(index, seed):
    trie = TrieTensors(index)
    decoder = HashDecoder(index, 2, seed)
    items, scores = constrained_beam_search(decoder, trie, index.n_items, index.n_items)
    for row in range(2):
        exact = decoder.exhaustive(row)
        assert int(items[row, 0]) == int(exact.argmax())
        assert torch.allclose(scores[row], exact.sort(descending=True).values, atol=1e-4)


def test_a_trie_with_an_item_inside_another_items_prefix_is_refused():
    pieces = ItemIndex(np.array([[0, -1], [0, 1]]), (2,), method="pieces", shared_codebook=True)
    with pytest.raises(ValueError, match="prefix-free"):
        TrieTensors(pieces)


def test_top_k_must_fit_in_the_beam():
    index = ItemIndex(np.array([[0], [1]]), (2,), method="test")
    with pytest.raises(ValueError, match="top_k"):
        constrained_beam_search(HashDecoder(index, 1, 0), TrieTensors(index), beam=1, top_k=2)


# ---------------------------------------------------------------- the LM decoder
@pytest.fixture(scope="module")
def index() -> ItemIndex:
    return RandomIndexer(NumberIndexConfig(codebook_size=4, seed=1)).build(IndexData(n_items=N_ITEMS))


def tiny_model(index: ItemIndex, backbone: str = "tiny-llama") -> CLLM4Rec:
    model = CLLM4Rec.from_config(
        ModelConfig(lora_r=4), BackboneConfig(backbone), N_USERS, N_ITEMS, item_index=index, seed=0
    )
    with torch.no_grad():  # spread the fresh code embeddings so that item scores differ clearly
        model.collab.family_weight("semantic").mul_(20)
    return model.eval()


def prompts_of(model: CLLM4Rec) -> FinetunePrompts:
    return FinetunePrompts(model.vocab, model.tokenizer, TEMPLATE)


def teacher_forced(model: CLLM4Rec, prompt: list[int], item: int) -> float:
    """log p(item's code tuple | prompt) through the training loss: no cache, no beam."""
    tokens = [int(t) for t in model.item_index.token_ids(model.vocab)[item] if t >= 0]
    first = model.vocab.family_range("semantic").start
    input_ids, labels = lm_example(prompt, tokens, [t - first for t in tokens])
    with torch.no_grad():
        nll, count = model.semantic_loss(
            collate([{"task": TASKS.index("semantic"), "input_ids": input_ids, "labels": labels}])
        )
    assert int(count) == len(tokens)
    return -float(nll)


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-gpt2"])
def test_cached_beam_search_matches_exhaustive_teacher_forcing(index, backbone):
    model = tiny_model(index, backbone)
    prompts = [prompts_of(model).encode(0, [1, 2]), prompts_of(model).encode(3, [5, 6, 7, 8, 9, 10, 11])]
    batch = collate([{"task": TASKS.index("semantic"), "input_ids": p} for p in prompts])  # right-padded
    trie = TrieTensors(index)
    decoder = ModelDecoder(model, batch["input_ids"], batch["attention_mask"], trie)
    items, scores = constrained_beam_search(decoder, trie, beam=N_ITEMS, top_k=N_ITEMS)
    for row, prompt in enumerate(prompts):
        exact = torch.tensor([teacher_forced(model, prompt, item) for item in range(N_ITEMS)])
        assert int(items[row, 0]) == int(exact.argmax())
        assert items[row].tolist() == exact.argsort(descending=True).tolist()
        assert torch.allclose(scores[row], exact[items[row]], atol=1e-4)


def test_semantic_examples_hold_out_the_target_and_label_its_codes(index):
    model = tiny_model(index)
    history = list(range(10))
    dataset = SemanticDataset([history], prompts_of(model), index, seed=3)
    first = model.vocab.family_range("semantic").start
    targets = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        example = dataset[0]
        assert example["task"] == TASKS.index("semantic") and dataset[0] == example
        kept, heldout = dataset.split(0)
        target = int(heldout[0])
        targets.add(target)
        tokens = index.token_ids(model.vocab)[target].tolist()
        assert example["input_ids"][-3:] == tokens
        assert model.vocab.item_token(target) not in example["input_ids"]  # the target is not in the prompt
        labelled = [label for label in example["labels"] if label != IGNORE]
        assert labelled == [t - first for t in tokens]
        assert example["labels"][-4] == tokens[0] - first  # the prompt's last position predicts level 0
    assert len(targets) > 1  # a different held-out item across epochs

    lm_sum, lm_count, _, reg_count = model(collate([dataset[0]]))
    assert int(lm_count) == 3 and torch.isfinite(lm_sum)
    assert int(reg_count) == 2 + len(dataset.split(0)[0])  # the user token twice and the prompt's items


def test_training_the_semantic_task_makes_beam_search_return_the_target(index):
    model = tiny_model(index).train()
    prompts = prompts_of(model)
    histories = {0: [1, 2, 3], 1: [4, 5, 6, 7]}
    targets = {0: 17, 1: 8}
    first = model.vocab.family_range("semantic").start
    examples = []
    for user, target in targets.items():
        tokens = index.token_ids(model.vocab)[target].tolist()
        input_ids, labels = lm_example(
            prompts.encode(user, histories[user]), tokens, [t - first for t in tokens]
        )
        examples.append({"task": TASKS.index("semantic"), "input_ids": input_ids, "labels": labels})
    batch = collate(examples)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(40):
        lm_sum, lm_count, reg_sum, reg_count = model(batch)
        (lm_sum / lm_count + reg_sum / reg_count).backward()
        optimizer.step()
        optimizer.zero_grad()
    exclude = sp.csr_matrix((np.ones(7), ([0, 0, 0, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6, 7])), shape=(2, N_ITEMS))
    scorer = GenerativeScorer(model, prompts, [histories[0], histories[1]], exclude=exclude, beam=5)
    items, scores = scorer.recommend(np.array([0, 1]))
    assert items[:, 0].tolist() == [targets[0], targets[1]]
    assert not set(items[0].tolist()) & set(histories[0]) and not set(items[1].tolist()) & set(histories[1])
    dense = scorer.score(np.array([0, 1]))
    assert dense.shape == (2, N_ITEMS) and torch.isinf(dense).sum(1).tolist() == [N_ITEMS - 5] * 2
    assert dense.argmax(1).tolist() == [targets[0], targets[1]]


def test_a_saved_model_keeps_its_index_and_decodes_the_same(index, tmp_path):
    model = tiny_model(index)
    model.save_pretrained(tmp_path)
    again = CLLM4Rec.from_pretrained(tmp_path).eval()
    assert np.array_equal(again.item_index.codes, index.codes)
    assert again.vocab.semantic_codebooks == index.codebook_sizes
    prompts = prompts_of(model)
    results = [
        GenerativeScorer(m, prompts, [[1, 2], [3]], beam=6).recommend(np.array([0, 1]))
        for m in (model, again)
    ]
    assert torch.equal(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1])


def test_a_model_without_index_says_what_is_missing():
    model = CLLM4Rec.from_config(ModelConfig(lora_r=4), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS)
    with pytest.raises(ValueError, match="no item index"):
        GenerativeScorer(model, prompts_of(model), [[1]] * N_USERS)


@pytest.mark.parametrize(
    "task, extra",
    [("semantic", []), ("semantic_sequence", []), ("semantic_sequence", ["--text_id_weight", "0.5"])],
)
def test_finetune_and_evaluate_recipes_run_the_semantic_task(ml100k_bundle, tmp_path, task, extra):
    import json
    import sys
    from pathlib import Path

    from data_prep import load_bundle

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import evaluate
    import finetune

    bundle = load_bundle(ml100k_bundle)
    index = RandomIndexer(NumberIndexConfig(codebook_size=12)).build(IndexData(n_items=bundle.n_items))
    index.save(tmp_path / "index")
    run = tmp_path / "run"
    tiny = ["--name_or_path", "tiny-llama", "--lora_r", "4", "--max_doc_tokens", "64"]
    finetune.main(
        ["--data", str(ml100k_bundle), "--output_dir", str(run), *tiny, "--index", str(tmp_path / "index")]
        + ["--task", task, "--with_content", "false", "--max_steps", "3", "--batch_size", "16", *extra]
    )
    assert any(f'"loss/{task}"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    metrics = evaluate.main(["--run", str(run), "--generate", "true", "--ks", "10,20", "--batch_size", "256"])
    assert metrics["users"] == 943 and 0 <= metrics["recall@20"] <= 1
    saved = json.loads((run / "metrics.json").read_text())["metrics"]
    assert saved["test/generate"]["recall@20"] == metrics["recall@20"]
    from llmrec.export import export_run
    from llmrec.recommender import Recommender

    # a generator bundle (tests/test_generator_bundle.py): the run's beam search, not its untrained item head
    rec = Recommender.from_pretrained(export_run(run, tmp_path / "bundle"), device="cpu")
    assert rec.mode == "generate" and rec.beam == 100  # eval.beam 0: the largest cut-off of the split
