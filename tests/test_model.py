"""The CLLM4Rec model on a tiny random backbone: what trains, what each loss scores, persistence."""

from __future__ import annotations

import math

import pytest
import torch

from llmrec.backbone import BackboneConfig
from llmrec.collate import PretrainDataset, collate
from llmrec.losses import ItemSoftmax
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.prompts import TASKS

N_USERS, N_ITEMS = 6, 25


def tiny_model(**overrides) -> CLLM4Rec:
    return CLLM4Rec.from_config(
        ModelConfig(lora_r=4, **overrides), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS, seed=0
    )


@pytest.fixture(scope="module")
def model() -> CLLM4Rec:
    return tiny_model()


def batch_of(model, rows):
    return collate([PretrainDataset(rows, model.vocab, model.tokenizer)[i] for i in range(len(rows))])


COLLAB = [
    {"kind": "collaborative", "prompt": "<user_1> has interacted with", "main": "<item_3> <item_9> <item_4>"}
]
CONTENT = [{"kind": "item", "prompt": "<item_3> is described as:", "main": "a heist film"}]


def test_only_lora_and_id_tables_train(model):
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or ".tables." in name for name in trainable)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 0 and set(model.trainable_state_dict()) == set(trainable)


def test_param_groups_split_lora_from_tables_and_head():
    model = tiny_model(head="untied", lora_per_view=True)
    lora, tables = model.param_groups(lr=1e-3, embedding_lr=1e-2, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(names[id(p)] for p in lora["params"] + tables["params"]) == sorted(names.values())
    assert lora["params"] and all("lora_" in names[id(p)] for p in lora["params"])
    assert {names[id(p)] for p in tables["params"] if names[id(p)].startswith("head.")} == {
        "head.weight",
        "head.bias",
    }
    assert {names[id(p)].split(".")[0] for p in tables["params"]} == {"collab", "content", "head"}
    assert (lora["lr"], lora["weight_decay"], tables["lr"], tables["weight_decay"]) == (1e-3, 0.1, 1e-2, 0.0)


def test_collaborative_loss_scores_item_tokens_only(model):
    lm_sum, count, _, _ = model(batch_of(model, COLLAB))
    assert int(count) == 3  # three main-text items, each predicted from the position before it
    # a freshly initialised model is close to the uniform-item baseline, far below a word-vocabulary softmax
    assert abs(lm_sum.item() / 3 - math.log(N_ITEMS)) < 1.0


def test_content_loss_scores_words(model):
    batch = batch_of(model, CONTENT)
    assert int(batch["task"][0]) == TASKS.index("content")
    lm_sum, count, _, _ = model(batch)
    assert int(count) == len(model.tokenizer(" a heist film", add_special_tokens=False)["input_ids"])
    assert lm_sum.item() / int(count) > math.log(N_ITEMS)  # a word vocabulary, not the 25 items


def test_mutual_regularisation_moves_only_the_active_view(model):
    model.zero_grad()
    ids = torch.tensor([[model.vocab.user_token(1), model.vocab.item_token(3), 5]])
    reg, count = model.mutual_regularization(ids, "collab")
    assert int(count) == 2 and reg.item() > 0
    reg.backward()
    assert model.collab.family_weight("item").grad[3].abs().sum() > 0
    assert model.content.family_weight("item").grad is None  # stop-gradient on the other view
    model.zero_grad()
    off = tiny_model(mutual_reg=0.0)
    assert off.mutual_regularization(ids, "collab")[0].item() == 0.0


@pytest.mark.parametrize("mode", ["chunked", "sampled"])
def test_item_softmax_variants_agree_with_the_full_softmax(mode):
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(4, 8), torch.randn(300, 8), torch.randn(300)
    targets = torch.tensor([[1, 5, -1], [7, -1, -1], [0, 299, 150], [42, 43, -1]])
    full = ItemSoftmax("full")(hidden, weight, bias, targets)
    logits = hidden @ weight.T + bias
    expected = -sum(
        torch.log_softmax(logits[b], -1)[t].item() for b in range(4) for t in targets[b] if t >= 0
    )
    assert full.item() == pytest.approx(expected, rel=1e-5)
    if mode == "chunked":
        assert ItemSoftmax("chunked", chunk_size=64)(hidden, weight, bias, targets).item() == pytest.approx(
            full.item(), rel=1e-5
        )
    else:
        log_q = torch.full((300,), -math.log(300.0))
        # many uniform samples, logQ-corrected: the estimate approaches the exact value
        estimate = ItemSoftmax("sampled", num_samples=200_000, log_q=log_q)(hidden, weight, bias, targets)
        assert estimate.item() == pytest.approx(full.item(), rel=0.05)


def test_untied_head_has_own_weights_and_bias():
    model = tiny_model(head="untied")
    assert model.item_weight() is model.head.weight and model.head.untied
    scores = model.score_items(
        torch.tensor([[model.vocab.user_token(0), 7, 8]]), torch.ones(1, 3, dtype=torch.long)
    )
    assert scores.shape == (1, N_ITEMS)


def test_save_and_load_round_trip_gives_identical_scores(model, tmp_path):
    with torch.no_grad():
        model.collab.family_weight("item").add_(0.5)  # something a fresh model would not have
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pkl"))
    again = CLLM4Rec.from_pretrained(tmp_path)
    ids = torch.tensor([[model.vocab.user_token(2), 40, 41, model.vocab.item_token(4)]])
    mask = torch.ones_like(ids)
    model.eval(), again.eval()
    assert torch.allclose(model.score_items(ids, mask), again.score_items(ids, mask))


def test_loading_weights_of_another_shape_fails_clearly(model, tmp_path):
    other = CLLM4Rec.from_config(ModelConfig(lora_r=4), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS + 1)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model.safetensors"):
        model.load_trainable(tmp_path / "model.safetensors")


def test_finetuning_can_untie_the_head_of_a_tied_model_but_not_back():
    model = tiny_model()
    model.reconfigure(head="untied", mutual_reg=0.5)
    assert model.config.head == "untied" and model.config.mutual_reg == 0.5
    assert torch.equal(model.head.weight.detach(), model.collab.family_weight("item").detach())
    assert "head.bias" in model.trainable_state_dict()
    with pytest.raises(ValueError, match="cannot change the item head"):
        model.reconfigure(head="tied")


def test_construction_depends_on_the_seed_only():
    first = tiny_model().trainable_state_dict()
    torch.manual_seed(1234)  # whatever ran before must not matter
    torch.rand(10)
    second = tiny_model().trainable_state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
