"""Zero-shot LM scoring: the trie and cached scorers equal naive scoring; prompts fit; the recipe runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import recipe_main
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep import load_bundle
from llmrec.backbone import load_backbone
from llmrec.metrics import DEFAULT_KS, evaluate_scorer, is_leave_one_out
from llmrec.pipeline import input_histories
from llmrec.trie import Trie
from llmrec.zeroshot import (
    EOS,
    PromptBuilder,
    PromptConfig,
    ZeroShotScorer,
    encode_items,
    score_cached,
    score_naive,
    score_top_k,
    score_trie,
)

# Shared prefixes ("Star Trek", "Heat"), a duplicate title and a title that is a prefix of another.
TITLES = [
    "Toy Story (1995)",
    "Heat (1995)",
    "Heat",
    "Star Trek (1979)",
    "Star Trek II (1982)",
    "Star Wars (1977)",
    "Twelve Monkeys (1995)",
    "Heat (1995)",
    "Se7en (1995)",
    "Shining, The (1980)",
]


@pytest.fixture(scope="module")
def tiny_llama():
    return load_backbone("tiny-llama")


@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=6), min_size=1, max_size=25))
@settings(max_examples=60, deadline=None)
def test_trie_paths_spell_sequences_and_preorder_intervals_hold(seqs):
    trie = Trie(seqs)
    for seq, node in zip(seqs, trie.terminal, strict=True):
        path = [*trie.path(int(node)), int(node)]
        assert trie.token[path].tolist() == seq
        assert trie.depth[node] == len(seq)
    # a is an ancestor-or-self of n iff a <= n < end[a]: check against parent pointers.
    for n in range(1, len(trie)):
        ancestors = {0, n, *trie.path(n).tolist()}
        assert {a for a in range(len(trie)) if a <= n < trie.end[a]} == ancestors
    # Every distinct prefix is exactly one node (plus the root).
    assert len(trie) == 1 + len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})


def test_trie_rejects_empty_sequence():
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        Trie([[1], []])


def test_naive_scorer_matches_the_models_own_loss(tiny_llama):
    model, tokenizer = tiny_llama
    prompt = tokenizer("Movies like Heat (1995), and")["input_ids"]
    item = tokenizer(" Toy Story (1995),", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + item])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss  # mean next-token NLL over the item's tokens
    result = score_naive(model, prompt, [item])
    assert result.total[0].item() == pytest.approx(-loss.item() * len(item), abs=1e-4)
    assert result.scores("mean")[0].item() == pytest.approx(-loss.item(), abs=1e-5)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_trie_and_cached_scoring_equal_naive(spec, chunk_size):
    model, tokenizer = load_backbone(spec)
    items = encode_items(TITLES, tokenizer, PromptConfig())
    prompt = tokenizer("Movies like Star Wars (1977), Heat (1995), and")["input_ids"]
    naive = score_naive(model, prompt, items)
    cached = score_cached(model, prompt, items, batch_size=3)
    trie = Trie(items)
    tree = score_trie(model, prompt, trie, chunk_size=chunk_size)
    torch.testing.assert_close(cached.total, naive.total, atol=1e-4, rtol=0)
    torch.testing.assert_close(tree.total, naive.total, atol=1e-4, rtol=0)
    assert torch.equal(tree.lengths, naive.lengths)
    assert tree.total[1] == tree.total[7]  # identical titles share a terminal node
    # The trie runs the prompt plus each inner node once: less than cached, far less than naive.
    assert tree.tokens_computed == len(prompt) + len(trie.inner)
    assert tree.tokens_computed < cached.tokens_computed < naive.tokens_computed


def test_trie_equals_naive_with_eager_attention_and_chat_prompt():
    """Eager attention adds the float mask itself; the chat style ends candidates with EOS."""
    model, tokenizer = load_backbone("tiny-llama")
    model.config._attn_implementation = "eager"
    config = PromptConfig(style="chat", max_history=2)
    scorer = ZeroShotScorer(model, tokenizer, TITLES, config, method="trie", chunk_size=5)
    assert all(ids[-1] == tokenizer.eos_token_id for ids in scorer.items)
    history = [0, 5, 9]
    prompt = scorer.build_prompt(history)
    assert tokenizer.decode(prompt).endswith("assistant\n")
    naive = score_naive(model, prompt, scorer.items)
    torch.testing.assert_close(scorer.likelihoods(history).total, naive.total, atol=1e-4, rtol=0)


def test_end_of_title_is_scored():
    """'Heat' and 'Heat (1995)' differ in their terminating token, so neither is a prefix of the other."""
    _, tokenizer = load_backbone("tiny-llama")
    heat, heat_1995 = encode_items(["Heat", "Heat (1995)"], tokenizer, PromptConfig())
    assert heat_1995[: len(heat)] != heat
    assert tokenizer.decode(heat) == " Heat,"
    eos = encode_items(["Heat"], tokenizer, PromptConfig(item_suffix=EOS))[0]
    assert eos[-1] == tokenizer.eos_token_id


def test_prompt_keeps_most_recent_history_and_fits_the_budget():
    _, tokenizer = load_backbone("tiny-llama")
    titles = ["A (1)", "B (2)", "C (3)", "D (4)"]
    build = PromptBuilder(tokenizer, titles, PromptConfig(max_history=3), max_prompt_tokens=1000)
    assert (
        tokenizer.decode(build([0, 1, 2, 3]), skip_special_tokens=True)
        == "Movies like D (4), C (3), B (2), and"
    )
    chrono = PromptBuilder(tokenizer, titles, PromptConfig(recent_first=False), max_prompt_tokens=1000)
    assert tokenizer.decode(chrono([0, 1, 2, 3]), skip_special_tokens=True).startswith("Movies like A (1), B")
    # Budget of the prompt with two items: the oldest items go first.
    two = len(build.encode_text(build.text([3, 2])))
    tight = PromptBuilder(tokenizer, titles, PromptConfig(max_history=3), max_prompt_tokens=two)
    assert tokenizer.decode(tight([0, 1, 2, 3]), skip_special_tokens=True) == "Movies like D (4), C (3), and"
    with pytest.raises(ValueError, match="without history"):
        PromptBuilder(tokenizer, titles, PromptConfig(), max_prompt_tokens=3)([0])


def test_scorer_rejects_a_budget_over_the_context(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="exceeds the model context"):
        ZeroShotScorer(model, tokenizer, TITLES, PromptConfig(max_prompt_tokens=10_000))
    with pytest.raises(ValueError, match="method must be one of"):
        ZeroShotScorer(model, tokenizer, TITLES, method="beam")


def test_mean_scores_divide_by_token_count(tiny_llama):
    model, tokenizer = tiny_llama
    scorer = ZeroShotScorer(model, tokenizer, TITLES, method="cached")
    result = scorer.likelihoods([1])
    lengths = np.array([len(t) for t in scorer.items])
    np.testing.assert_allclose(result.scores("mean").numpy(), result.total.numpy() / lengths)
    with pytest.raises(ValueError, match="normalize"):
        result.scores("max")
    result.total[0] = -torch.inf  # plain tensors: callers may mask scores in place


WORDS = ["Heat", "Babe", "Fargo", "Star", "Trek", "Wars", "Toy", "Story", "Night", "Day", "Red", "Blue"]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> str:
    """24 users x 30 items with titles sharing words, split at random by data_prep (seeded)."""
    from data_prep.build import BuildConfig, build

    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("zs-src")
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(24):
        for t, item in enumerate(rng.choice(30, size=10, replace=False)):
            inter.append(f"u{user}\ti{item}\t4\t{1000 * user + t}")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for item in range(30):
        title = " ".join(rng.choice(WORDS, size=1 + item % 3))
        items.append(f"i{item}\t{title}\t{1990 + item % 7}\tDrama")
    (src / "zs.inter").write_text("\n".join(inter) + "\n")
    (src / "zs.item").write_text("\n".join(items) + "\n")
    out = tmp_path_factory.mktemp("zs-bundle") / "bundle"
    return str(build(BuildConfig(input=str(src), out=str(out), format="recbole", split="random", seed=0)))


def saved_prior_weight(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["prior"]["prior_weight"]


def test_calibrated_score_equals_its_definition(tiny_llama):
    model, tokenizer = tiny_llama
    prompt = PromptConfig(neutral_history="films")
    scorer = ZeroShotScorer(model, tokenizer, TITLES, prompt)
    got = scorer.variants(scorer.likelihoods([0, 3]))
    items = encode_items(TITLES, tokenizer, prompt)
    history = tokenizer("Movies like Star Trek (1979), Toy Story (1995), and")["input_ids"]
    neutral = tokenizer("Movies like films, and")["input_ids"]
    with_history, without = score_naive(model, history, items), score_naive(model, neutral, items)
    assert torch.allclose(got["calibrated"], with_history.total - without.total, atol=1e-4)
    assert torch.allclose(got["sum"], with_history.total, atol=1e-4)
    assert torch.allclose(got["mean"], with_history.total / with_history.lengths, atol=1e-4)
    # a candidate subset scores the same titles the same way; the history may name any item
    subset = ZeroShotScorer(model, tokenizer, TITLES, prompt, candidates=[1, 5, 9])
    assert torch.allclose(
        subset.variants(subset.likelihoods([0, 3]))["calibrated"], got["calibrated"][[1, 5, 9]], atol=1e-4
    )


def test_recipe_runs_end_to_end_on_a_tiny_model(tiny_bundle, tmp_path, capsys):
    main = recipe_main("zeroshot")
    args = ["--data", tiny_bundle, "--split", "test", "--max_users", "6", "--name_or_path", "tiny-llama"]
    args += ["--output_dir", str(tmp_path / "run"), "--chunk_size", "64", "--max_history", "5"]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        rows = main(args)
    finally:
        root.handlers[:], root.level = handlers, level
    assert set(rows) == {
        "zeroshot-sum",
        "zeroshot-mean",
        "zeroshot-calibrated",
        "zeroshot-calibrated+pop",
        "pop",
        "random",
    }
    assert saved_prior_weight(tmp_path / "run") in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    choice = json.loads((tmp_path / "run" / "metrics.json").read_text())["prior"]
    assert choice["calibration"] in (0.0, 0.5, 1.0) and len(choice["valid_ndcg@20"]) == 18
    assert {r["users"] for r in rows.values()} == {6}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["metrics"]["zeroshot-sum"]["recall@20"] == rows["zeroshot-sum"]["recall@20"]
    assert len(saved["users"]) == 6 and saved["config"]["backbone"]["name_or_path"] == "tiny-llama"
    assert saved["timing"]["tokens_per_user"] > 0
    out = capsys.readouterr().out
    assert "zeroshot-sum" in out and "random" in out

    # The recipe's zero-shot ranking is the scorer's: recompute the users' metrics by naive scoring.
    bundle = load_bundle(tiny_bundle)
    model, tokenizer = load_backbone("tiny-llama")
    scorer = ZeroShotScorer(model, tokenizer, bundle.item_titles, PromptConfig(max_history=5), method="naive")
    users = saved["users"]
    assert is_leave_one_out(bundle) and saved["history"] == "train+valid"  # the test prompt: train + valid
    naive = evaluate_scorer(
        scorer.users(input_histories(bundle, "test")),
        bundle,
        "test",
        users=users,
        ks=DEFAULT_KS,  # the recipe's cut-offs, also where the tiny bundle looks leave-one-out
        progress=False,
    )
    assert naive == pytest.approx(rows["zeroshot-sum"])

    # --top_k: the same @K <= k metrics from a fraction of the work, and no length-normalised row.
    try:
        top = main([*args, "--top_k", "10", "--output_dir", str(tmp_path / "top")])
    finally:
        root.handlers[:], root.level = handlers, level
    assert set(top) == {"zeroshot-sum", "pop", "random"}
    assert "recall@20" not in top["zeroshot-sum"]
    for key in ("recall@10", "ndcg@10", "recall_recbole@10", "mrr@10"):
        assert top["zeroshot-sum"][key] == pytest.approx(rows["zeroshot-sum"][key])
    timing = json.loads((tmp_path / "top" / "metrics.json").read_text())["timing"]
    assert timing["tokens_per_user"] < saved["timing"]["tokens_per_user"]

    # a fixed (calibration, prior weight): full scoring and the top-k search that looks for the best
    # calibrated+pop items agree at @K <= k
    fixed = ["--calibration", "0.5", "--prior_weight", "1.0"]
    try:
        full = main([*args, *fixed, "--output_dir", str(tmp_path / "fixed")])
        searched = main([*args, *fixed, "--top_k", "10", "--output_dir", str(tmp_path / "fixed-top")])
    finally:
        root.handlers[:], root.level = handlers, level
    assert set(searched) == {"zeroshot-calibrated+pop", "pop", "random"}
    for key in ("recall@10", "ndcg@10"):
        assert searched["zeroshot-calibrated+pop"][key] == pytest.approx(full["zeroshot-calibrated+pop"][key])
    assert json.loads((tmp_path / "fixed" / "metrics.json").read_text())["prior"]["chosen_on"] is None


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("k,chunk_size", [(1, 2), (3, 4), (4, 256)])
def test_top_k_search_finds_the_exact_top_k(tiny_llama, k, chunk_size, with_prior):
    """The exact top-k by log-likelihood, or by log-likelihood plus a per-item prior."""
    model, tokenizer = tiny_llama
    items = encode_items(TITLES, tokenizer, PromptConfig())
    prompt = tokenizer("Movies like Star Wars (1977), Heat (1995), and")["input_ids"]
    trie = Trie(items)
    full = score_trie(model, prompt, trie).total
    exclude = [0, 3]
    allowed = torch.ones(len(items), dtype=torch.bool)
    allowed[exclude] = False
    prior = torch.zeros(len(items), dtype=torch.float64)
    if with_prior:  # wider than the log-likelihoods: the best by log-likelihood alone drops to the bottom
        spread = float(full.max() - full.min())
        prior = torch.linspace(0.0, 2 * spread, len(items), dtype=torch.float64)
        prior[full.masked_fill(~allowed, -torch.inf).argmax()] = -2 * spread
    top = score_top_k(
        model, prompt, trie, k, exclude=exclude, chunk_size=chunk_size, prior=prior if with_prior else None
    )
    reached = torch.isfinite(top.total)
    torch.testing.assert_close(top.total[reached], full[reached], atol=1e-4, rtol=0)
    score = (full + prior).masked_fill(~allowed, -torch.inf)
    best = score.topk(k).indices
    assert reached[best].all()
    ranked = (top.total + prior).masked_fill(~allowed, -torch.inf).topk(k).indices
    torch.testing.assert_close(score[ranked], score[best], atol=1e-4, rtol=0)
    if with_prior:  # the prior did reorder: the top-k by log-likelihood alone is another set
        alone = full.masked_fill(~allowed, -torch.inf).topk(k).indices
        assert set(alone.tolist()) != set(best.tolist())
    assert top.tokens_computed <= len(prompt) + len(trie.inner)
    assert not top.complete
    with pytest.raises(ValueError, match="every item scored"):
        top.scores("mean")


def test_trie_subtree_max_is_the_max_over_each_preorder_interval():
    trie = Trie([[1, 2], [1, 3, 4], [5], [1, 3]])
    values = np.random.default_rng(0).normal(size=len(trie))
    expected = [values[n : trie.end[n]].max() for n in range(len(trie))]
    np.testing.assert_allclose(trie.subtree_max(values), expected)


def test_top_k_search_prunes_the_trie(tiny_llama):
    """k=1 over 64 three-word titles: a good part of the trie is never run (about a third here)."""
    model, tokenizer = tiny_llama
    titles = [f"{a} {b} {c}" for a in WORDS[:4] for b in WORDS[4:8] for c in WORDS[8:]]
    items = encode_items(titles, tokenizer, PromptConfig())
    trie = Trie(items)
    prompt = tokenizer("Movies like Heat, and")["input_ids"]
    top = score_top_k(model, prompt, trie, 1, chunk_size=8)
    full = score_trie(model, prompt, trie).total
    assert top.total.argmax() == full.argmax()
    assert top.tokens_computed < 0.8 * (len(prompt) + len(trie.inner))
