"""User-table options (full, none, hashed, low-rank), sparse row updates, and their round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from llmrec.backbone import BackboneConfig
from llmrec.id_tables import HashedTable, UserTableSpec, hash_coefficients
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.optim import RowSparseAdamW, clip_sparse_grad_norm_
from llmrec.plain_model import export_plain_model
from llmrec.tokens import RecEmbedding, RecVocab

HIDDEN = 8


def test_hashing_is_deterministic_in_range_and_spreads_users():
    first, again = HashedTable(10_000, 97, 3, HIDDEN), HashedTable(10_000, 97, 3, HIDDEN)
    users = torch.arange(10_000)
    buckets = first.bucket_ids(users)
    assert torch.equal(buckets, again.bucket_ids(users))  # a rebuilt table (a reload) hashes alike
    assert buckets.shape == (10_000, 3) and int(buckets.min()) >= 0 and int(buckets.max()) < 97
    # pinned: the hash functions must never change, or a saved table would give users other rows
    assert buckets[[0, 1, 2, 9999]].tolist() == [[81, 93, 93], [91, 79, 48], [36, 33, 3], [19, 37, 78]]
    counts = np.bincount(buckets[:, 0].numpy(), minlength=97)
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()
    # two users share every row only when all hashes collide: with 3 hashes over 97 buckets, hardly ever
    assert len({tuple(row) for row in buckets.tolist()}) > 9_900
    assert not torch.equal(buckets[:, 0], buckets[:, 1])  # the hash functions differ


def test_hash_coefficients_are_pinned_universal_hash_parameters():
    a, b = hash_coefficients(2)
    assert (a.tolist(), b.tolist()) == ([758141340, 548905785], [1737674898, 653024645])
    assert a.dtype == np.int64 and (a > 0).all() and (a < 2**31 - 1).all() and (b < 2**31 - 1).all()


@pytest.mark.parametrize("kind", ["full", "none", "hashed", "lowrank"])
def test_each_table_embeds_users_at_the_asked_scale_and_materializes(kind):
    base = nn.Embedding(50, HIDDEN)
    vocab = RecVocab(50, n_users=300, n_items=7)
    spec = UserTableSpec(kind, buckets=64, hashes=2, rank=4)
    emb = RecEmbedding(base, vocab, std=0.5, users=spec, seed=3)
    users = torch.arange(300)
    rows = emb(users + vocab.family_range("user").start).detach()
    assert rows.shape == (300, HIDDEN)
    assert torch.equal(emb.family_rows("user"), rows)
    assert torch.equal(emb.full_weight()[vocab.family_range("user").start :][:300], rows)
    if kind == "none":
        assert torch.equal(rows, rows[:1].expand_as(rows))  # one row stands for every user
    else:
        assert 0.3 < float(rows.std()) < 0.7
        # hashed: 2 of 64 buckets per user, so some of the 300 users share both (the memory saved)
        assert len({tuple(r) for r in rows.tolist()}) >= (270 if kind == "hashed" else 300)
    params = sum(p.numel() for p in emb.tables["user"].parameters())
    assert (
        params
        == {"full": 300 * HIDDEN, "none": HIDDEN, "hashed": 64 * HIDDEN, "lowrank": 300 * 4 + 4 * HIDDEN}[
            kind
        ]
    )
    # the other families are untouched full tables
    assert isinstance(emb.tables["item"], nn.Embedding)
    if kind != "full":
        with pytest.raises(ValueError, match="not a full table"):
            emb.family_weight("user")


def test_full_table_keeps_its_numbers():
    """The default table draws exactly as before the options existed (runs stay reproducible)."""
    base = nn.Embedding(50, HIDDEN)
    vocab = RecVocab(50, n_users=5, n_items=7)
    emb = RecEmbedding(base, vocab, std=0.1, seed=0)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(emb.family_weight("user"), torch.randn(5, HIDDEN, generator=gen) * 0.1)
    assert torch.equal(emb.family_weight("item"), torch.randn(7, HIDDEN, generator=gen) * 0.1)


def _sparse_and_dense(seed: int = 0) -> tuple[nn.Embedding, nn.Embedding]:
    torch.manual_seed(seed)
    dense = nn.Embedding(20, HIDDEN)
    sparse = nn.Embedding(20, HIDDEN, sparse=True)
    sparse.weight.data.copy_(dense.weight.data)
    return sparse, dense


def test_sparse_updates_equal_dense_adam_on_touched_rows_and_leave_the_rest():
    sparse, dense = _sparse_and_dense()
    extra = nn.Parameter(torch.randn(HIDDEN))  # a dense parameter in the same optimizer (LoRA's place)
    extra_dense = nn.Parameter(extra.detach().clone())
    opt_sparse = RowSparseAdamW([{"params": [sparse.weight, extra], "lr": 0.05, "weight_decay": 0.0}])
    opt_dense = torch.optim.AdamW([{"params": [dense.weight, extra_dense], "lr": 0.05, "weight_decay": 0.0}])
    before = sparse.weight.detach().clone()
    rows = torch.tensor([[1, 4, 4, 9], [9, 1, 13, 4]])  # repeated rows: their gradients add up
    target = torch.randn(2, 4, HIDDEN, generator=torch.Generator().manual_seed(1))
    for step in range(5):
        for table, vector, opt in ((sparse, extra, opt_sparse), (dense, extra_dense, opt_dense)):
            opt.zero_grad()
            loss = ((table(rows) + vector - target * (step + 1)) ** 2).sum()
            loss.backward()
            opt.step()
    touched = torch.tensor([1, 4, 9, 13])
    untouched = torch.tensor([r for r in range(20) if r not in touched.tolist()])
    assert sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight[touched], dense.weight[touched], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(extra, extra_dense, rtol=0, atol=0)  # dense params go through AdamW itself
    assert torch.equal(sparse.weight[untouched], before[untouched])
    assert not torch.equal(sparse.weight[touched], before[touched])
    state = opt_sparse.state[sparse.weight]
    assert float(state["step"]) == 5 and bool((state["exp_avg"][untouched] == 0).all())
    # the optimizer state is ordinary AdamW state: it saves and loads like AdamW's
    reloaded = RowSparseAdamW([{"params": [sparse.weight, extra], "lr": 0.05, "weight_decay": 0.0}])
    reloaded.load_state_dict(opt_sparse.state_dict())
    assert torch.equal(reloaded.state[sparse.weight]["exp_avg"], state["exp_avg"])


def test_rows_looked_up_only_to_be_masked_out_are_not_touched():
    sparse, _ = _sparse_and_dense()
    opt = RowSparseAdamW([sparse.weight], lr=0.1)
    before = sparse.weight.detach().clone()
    out = sparse(torch.tensor([2, 0]))
    keep = torch.tensor([True, False])[:, None]
    torch.where(keep, out, torch.zeros_like(out)).sum().backward()  # RecEmbedding's merge of families
    opt.step()
    assert not torch.equal(sparse.weight[2], before[2])
    assert torch.equal(sparse.weight[0], before[0])


def test_clipping_covers_sparse_and_dense_gradients_like_torch():
    sparse, dense = _sparse_and_dense()
    other, other_dense = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    rows = torch.tensor([3, 3, 5])
    (sparse(rows).sum() * 10 + other.sum()).backward()
    (dense(rows).sum() * 10 + other_dense.sum()).backward()
    norm = clip_sparse_grad_norm_([sparse.weight, other], 1.0)
    expected = torch.nn.utils.clip_grad_norm_([dense.weight, other_dense], 1.0)
    torch.testing.assert_close(norm, expected)
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    torch.testing.assert_close(other.grad, other_dense.grad)


@pytest.mark.parametrize("kind", ["none", "hashed", "lowrank"])
def test_sparse_user_tables_train_in_the_model(kind):
    config = ModelConfig(lora_r=2, user_table=kind, user_buckets=5, user_rank=3, sparse_updates=True)
    model = CLLM4Rec.from_config(config, BackboneConfig("tiny-llama"), 12, 9, seed=0)
    vocab = model.vocab
    ids = torch.tensor([[vocab.user_token(3), 40, vocab.item_token(2), vocab.item_token(5)]])
    batch = {"task": torch.tensor([2]), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["targets"] = torch.tensor([[1, 4]])
    opt = RowSparseAdamW(model.param_groups(1e-3, 1e-2))
    before = model.collab.family_rows("user").clone()
    lm_sum, lm_count, reg_sum, reg_count = model(batch)
    (lm_sum / lm_count + reg_sum / reg_count).backward()
    opt.step()
    after = model.collab.family_rows("user")
    assert not torch.equal(after[3], before[3])
    if kind == "hashed":  # only user 3's buckets moved: users sharing none of them kept their rows
        table = model.collab.tables["user"]
        mine = set(table.bucket_ids(torch.tensor(3)).tolist())
        apart = [u for u in range(12) if not mine & set(table.bucket_ids(torch.tensor(u)).tolist())]
        assert apart and torch.equal(after[apart], before[apart])


def test_plain_export_writes_every_user_row_of_a_hashed_table(tmp_path):
    from llmrec.backbone import load_backbone

    lm, tokenizer = load_backbone(BackboneConfig("tiny-llama"))
    vocab = RecVocab(lm.get_input_embeddings().weight.shape[0], n_users=6, n_items=4)
    emb = RecEmbedding(lm.get_input_embeddings(), vocab, users=UserTableSpec("hashed", buckets=3))
    export_plain_model(lm, tokenizer, vocab, emb, tmp_path / "plain")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    users = vocab.family_range("user")
    torch.testing.assert_close(
        plain.get_input_embeddings().weight[users.start : users.stop], emb.family_rows("user")
    )
