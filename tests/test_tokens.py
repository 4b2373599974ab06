"""RecVocab placeholder encoding, id layout, save/load; RecEmbedding lookups and inits; plain export."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AddedToken,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from llmrec.plain_model import export_plain_model
from llmrec.tokens import RecEmbedding, RecVocab, TokenNames

WORDS = [
    "the",
    "user",
    "has",
    "interacted",
    "with",
    "writes",
    "review",
    "for",
    "is",
    "described",
    "as:",
    "toy",
]
CORPUS = [
    "the user has interacted with the item, and the user will interact with",
    "writes the following review for the movie: a toy story about toys",
    "is described as: Toy Story (1995) Animation|Children's|Comedy",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (GPT-2 style: ' has' and 'has' tokenize differently), built in code."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture()
def vocab(tokenizer) -> RecVocab:
    return RecVocab(len(tokenizer), n_users=6, n_items=9, semantic_codebooks=(4, 3, 5))


def reference_encode(vocab: RecVocab, text: str, tokenizer) -> list[int]:
    """Slow reference: re.split, one tokenizer call per word part, the documented whitespace rules."""
    pattern = r"(<user_\d+>|<item_\d+>|<s\d+_\d+>)"
    pieces = re.split(pattern, text)
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if k % 2 == 1:
            kind, rest = piece[1:-1].split("_")
            if kind == "user":
                ids.append(vocab.user_token(int(rest)))
            elif kind == "item":
                ids.append(vocab.item_token(int(rest)))
            else:
                ids.append(vocab.semantic_token(int(kind[1:]), int(rest)))
            continue
        if k + 1 < len(pieces):  # followed by a placeholder: drop trailing whitespace
            piece = piece.rstrip()
        elif k > 0 and piece.isspace():  # trailing whitespace after the last placeholder
            piece = ""
        if piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids


def random_texts(vocab: RecVocab, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 8)):
            r = rng.random()
            if r < 0.2:
                parts.append(f"<user_{rng.randrange(vocab.n_users)}>")
            elif r < 0.4:
                parts.append(f"<item_{rng.randrange(vocab.n_items)}>")
            elif r < 0.5:
                level = rng.randrange(len(vocab.semantic_codebooks))
                parts.append(f"<s{level}_{rng.randrange(vocab.semantic_codebooks[level])}>")
            else:
                parts.append(" ".join(rng.choices(WORDS, k=rng.randint(1, 4))))
            parts.append(rng.choice(["", " ", " ", "  ", ", ", "\n"]))
        texts.append("".join(parts))
    return texts


def test_encode_matches_slow_reference(vocab, tokenizer):
    texts = random_texts(vocab, 300) + [
        "",
        " ",
        "<user_1>",
        "  <item_2>  ",
        "toy<item_3>toy",
        "<item_0>\n<item_1> ",
    ]
    for text in texts:
        assert vocab.encode(text, tokenizer) == reference_encode(vocab, text, tokenizer), text
    assert vocab.encode_batch(texts, tokenizer) == [reference_encode(vocab, t, tokenizer) for t in texts]


def test_encode_matches_added_token_tokenizer(vocab, tokenizer):
    """The fast path gives what a tokenizer with the placeholders as lstrip added tokens gives."""
    slow = AutoTokenizer.from_pretrained(_save(tokenizer))
    slow.add_tokens([AddedToken(p, lstrip=True, normalized=False) for p in vocab.placeholders()])
    texts = [t.rstrip() for t in random_texts(vocab, 200, seed=1)]
    texts += ["<user_3> has interacted with <item_1> <item_2>, <user_3> will interact with"]
    for text in texts:
        assert vocab.encode(text, tokenizer) == slow.encode(text, add_special_tokens=False), text


def _save(tokenizer) -> str:
    import tempfile

    path = tempfile.mkdtemp()
    tokenizer.save_pretrained(path)
    return path


def test_mid_sentence_word_parts_keep_their_space(vocab, tokenizer):
    ids = vocab.encode("<user_3> has interacted with", tokenizer)
    assert ids[0] == vocab.user_token(3)
    assert ids[1:] == tokenizer.encode(" has interacted with", add_special_tokens=False)
    assert ids[1:] != tokenizer.encode("has interacted with", add_special_tokens=False)
    assert vocab.encode("<item_1> <item_2>  <item_3>", tokenizer) == [vocab.item_token(i) for i in (1, 2, 3)]


def test_id_layout(vocab, tokenizer):
    ranges = [vocab.family_range(name) for name in ("user", "item", "semantic")]
    assert ranges[0].start == vocab.base_size == len(tokenizer)
    for a, b in zip(ranges[:-1], ranges[1:], strict=True):
        assert a.stop == b.start
    assert ranges[-1].stop == vocab.total_size == len(tokenizer) + 6 + 9 + 12
    assert [len(vocab.level_range(k)) for k in range(3)] == [4, 3, 5]
    # every new id round-trips through its placeholder and none lands in the base vocabulary
    for token_id in range(vocab.base_size, vocab.total_size):
        text = vocab.placeholder(token_id)
        assert vocab.encode(text, tokenizer) == [token_id]
    assert vocab.semantic_token(1, 2) == vocab.family_range("semantic").start + 4 + 2
    with pytest.raises(ValueError, match="not an ID token"):
        vocab.placeholder(vocab.base_size - 1)
    with pytest.raises(ValueError, match="not an ID token"):
        vocab.placeholder(vocab.total_size)
    empty = RecVocab(10, 0, 3)
    assert len(empty.family_range("user")) == 0 and list(empty.families()) == ["item"]


def test_out_of_range_placeholders_raise(vocab, tokenizer):
    for bad in ("<user_6>", "<item_9>", "<s3_0>", "<s1_3>"):
        with pytest.raises(ValueError, match=re.escape(bad)):
            vocab.encode(f"hello {bad} world", tokenizer)


def test_decode_round_trip(vocab, tokenizer):
    text = "<user_3> has interacted with <item_1> <item_2>, <user_3> will interact with <s0_1> <s2_4>"
    assert vocab.decode(vocab.encode(text, tokenizer), tokenizer) == text


def test_custom_names_and_save_load(tmp_path, tokenizer):
    names = TokenNames(user="U", item="movie", semantic="code")
    vocab = RecVocab(len(tokenizer), 4, 5, (2, 2), names)
    assert vocab.encode("<U_1> <movie_4> <code1_1> <item_1>", tokenizer)[:3] == [
        vocab.user_token(1),
        vocab.item_token(4),
        vocab.semantic_token(1, 1),
    ]
    vocab.save_pretrained(tmp_path)
    loaded = RecVocab.from_pretrained(tmp_path)
    assert (
        loaded == vocab and loaded.names == names and loaded.placeholder(vocab.item_token(2)) == "<movie_2>"
    )
    with pytest.raises(ValueError):
        TokenNames(user="s", semantic="s")
    with pytest.raises(FileNotFoundError):
        RecVocab.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------------------- RecEmbedding
def test_rec_embedding_lookup_and_grads(vocab):
    torch.manual_seed(0)
    base = nn.Embedding(vocab.base_size, 8).to(torch.bfloat16)
    emb = RecEmbedding(base, vocab)
    assert emb.base is base and not base.weight.requires_grad
    assert set(emb.state_dict()) == {"tables.user.weight", "tables.item.weight", "tables.semantic.weight"}
    ids = torch.tensor([[5, vocab.user_token(2), vocab.item_token(8)], [vocab.semantic_token(2, 4), 0, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, 8) and out.dtype == torch.bfloat16
    assert torch.equal(out[0, 0], base.weight[5])
    assert torch.equal(out[0, 1], emb.family_weight("user")[2].to(torch.bfloat16))
    assert torch.equal(out[0, 2], emb.family_weight("item")[8].to(torch.bfloat16))
    assert torch.equal(out[1, 0], emb.family_weight("semantic")[4 + 3 + 4].to(torch.bfloat16))
    out.float().sum().backward()
    grad_rows = emb.family_weight("item").grad.abs().sum(1).nonzero().flatten().tolist()
    assert grad_rows == [8]
    with torch.no_grad():  # shared reference: a change to the backbone's table is seen
        base.weight[5] += 1
    assert torch.equal(emb(torch.tensor([5]))[0], base.weight[5])
    assert emb.full_weight().shape == (vocab.total_size, 8)


def test_rec_embedding_normal_init_is_seeded_and_scaled(vocab):
    base = nn.Embedding(vocab.base_size, 64)
    nn.init.normal_(base.weight, std=0.5)
    a, b = RecEmbedding(base, vocab, seed=3), RecEmbedding(base, vocab, seed=3)
    assert torch.equal(a.family_weight("user"), b.family_weight("user"))
    assert a.family_weight("item").std().item() == pytest.approx(0.5, rel=0.25)
    c = RecEmbedding(base, vocab, std=0.01)
    assert c.family_weight("item").std().item() == pytest.approx(0.01, rel=0.25)


def test_rec_embedding_title_mean_init(vocab, tokenizer):
    base = nn.Embedding(vocab.base_size, 16)
    titles = [f"toy story {k}" for k in range(vocab.n_items - 1)] + [""]
    emb = RecEmbedding(base, vocab, init="title_mean", titles=titles, tokenizer=tokenizer)
    for k in (0, 3):
        ids = tokenizer.encode(titles[k], add_special_tokens=False)
        torch.testing.assert_close(emb.family_weight("item")[k], base.weight[ids].mean(0))
    assert emb.family_weight("item")[-1].abs().sum() > 0  # empty title keeps the normal init
    with pytest.raises(ValueError, match="titles"):
        RecEmbedding(base, vocab, init="title_mean")


def test_rec_embedding_semantic_sum_init(vocab):
    base = nn.Embedding(vocab.base_size, 16)
    codes = np.array([[k % 4, k % 3, k % 5] for k in range(vocab.n_items)])
    codes[0, 2] = -1  # padding is skipped
    emb = RecEmbedding(base, vocab, init="semantic_sum", item_index=SimpleNamespace(codes=codes))
    sem = emb.family_weight("semantic")
    for k in (0, 7):
        rows = [
            int(vocab.semantic_token(level, c)) - vocab.family_range("semantic").start
            for level, c in enumerate(codes[k])
            if c >= 0
        ]
        torch.testing.assert_close(emb.family_weight("item")[k], sem[rows].sum(0))
    with pytest.raises(ValueError, match="exceed"):
        RecEmbedding(base, vocab, init="semantic_sum", item_index=SimpleNamespace(codes=codes + 5))


def test_rec_embedding_code_init_from_titles(vocab, tokenizer):
    """Each code starts at the mean title embedding of the items holding it at its level minus the
    level's mean over all items, at the normal init's RMS; a code no item holds keeps its normal init."""
    base = nn.Embedding(vocab.base_size, 16)
    titles = [f"toy story {k}" for k in range(vocab.n_items)]
    codes = np.array([[k % 2, k % 3, 0] for k in range(vocab.n_items)])
    kwargs = dict(titles=titles, tokenizer=tokenizer, item_index=SimpleNamespace(codes=codes), std=0.05)
    emb = RecEmbedding(base, vocab, code_init="title_mean", **kwargs)
    means = torch.stack([base.weight[tokenizer.encode(t, add_special_tokens=False)].mean(0) for t in titles])
    sem = emb.family_weight("semantic")
    for level, code in ((0, 1), (1, 2)):
        holders = torch.as_tensor(codes[:, level] == code)
        expected = means[holders].mean(0) - means.mean(0)
        expected = expected * 0.05 / expected.pow(2).mean().sqrt()
        row = int(vocab.semantic_token(level, code)) - vocab.family_range("semantic").start
        torch.testing.assert_close(sem[row], expected)
    normal = RecEmbedding(base, vocab, **kwargs).family_weight("semantic")
    for unused in ((2, 3), (2, 0)):  # no item holds it; every item holds it
        row = int(vocab.semantic_token(*unused)) - vocab.family_range("semantic").start
        torch.testing.assert_close(sem[row], normal[row])
    with pytest.raises(ValueError, match="needs titles, tokenizer and item_index"):
        RecEmbedding(base, vocab, code_init="title_mean", titles=titles, tokenizer=tokenizer)


# ---------------------------------------------------------------------------- plain export
def test_export_plain_model(tmp_path, tokenizer):
    base_size = len(tokenizer) + 3  # a padded embedding table: reserved tokens fill the gap
    vocab = RecVocab(base_size, 3, 4, (2,))
    config = LlamaConfig(
        vocab_size=base_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    emb = RecEmbedding(model.get_input_embeddings(), vocab)
    expected = emb.full_weight().clone()
    out = export_plain_model(model, tokenizer, vocab, emb, tmp_path / "plain")
    assert len(tokenizer) == base_size - 3  # the caller's tokenizer is untouched
    loaded = AutoModelForCausalLM.from_pretrained(out)
    loaded_tok = AutoTokenizer.from_pretrained(out)
    torch.testing.assert_close(loaded.get_input_embeddings().weight, expected)
    torch.testing.assert_close(loaded.get_output_embeddings().weight[base_size:], expected[base_size:])
    text = "<user_2> has interacted with <item_1> <item_3> <s0_1>"
    assert loaded_tok.encode(text, add_special_tokens=False) == vocab.encode(text, tokenizer)
    assert RecVocab.from_pretrained(out) == vocab
