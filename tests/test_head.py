"""The item head as one module (`llmrec.head.ItemHead`): nothing else compares its option strings, its
weights keep loading under the names they had before it was a module, its blend weight is state."""

from __future__ import annotations

import ast
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_recommender import FIXTURE, data  # noqa: F401  (data is a fixture)

from common.io import file_records
from llmrec.backbone import BackboneConfig
from llmrec.bundle import CONFIG_FILE, WEIGHTS_FILE, config_checksum
from llmrec.head import LEGACY_NAMES, PRIOR_WEIGHTS, ItemHead, blend_scores
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.prompts import FinetunePrompts, prompt_batch
from llmrec.recommender import Recommender
from llmrec.run import PRIOR_FILE, run_model, run_prior_weight, write_prior_weight

REPO = Path(__file__).resolve().parents[1]
N_USERS, N_ITEMS = 5, 20
HEAD_OPTIONS = {"head", "prior", "history_pool", "pool_kind", "prior_kind"}  # attributes and keys
HEAD_CHOICES = {"tied", "untied"}  # values no other option takes ("ease" is also a baseline's name)
ALLOWED = {"llmrec/head.py", "llmrec/options.py"}  # the head, and the options' definitions


# ---------------------------------------------------------------------------------- no string tests
def strings(node: ast.AST) -> list[str]:
    """The string constants ``node`` is, or holds as a tuple/list/set literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [value for element in node.elts for value in strings(element)]
    return []


def names_an_option(node: ast.AST) -> bool:
    """``x.head``, ``x["prior"]``, ``getattr(x, "history_pool")`` and the like."""
    if isinstance(node, ast.Attribute):
        return node.attr in HEAD_OPTIONS
    if isinstance(node, ast.Subscript):
        return bool(set(strings(node.slice)) & HEAD_OPTIONS)
    if isinstance(node, ast.Call) and node.args:
        return any(set(strings(arg)) & HEAD_OPTIONS for arg in node.args) and (
            ast.unparse(node.func) in ("getattr", "get") or ast.unparse(node.func).endswith(".get")
        )
    return False


def option_comparisons(path: Path) -> list[str]:
    """``line: source`` of every comparison in ``path`` of a head/prior/pool option with a string, or of
    anything with one of the head's own choices."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        texts = [value for operand in operands for value in strings(operand)]
        if (texts and any(names_an_option(o) for o in operands)) or set(texts) & HEAD_CHOICES:
            found.append((node.lineno, f"{node.lineno}: {ast.unparse(node)}"))
    return [text for _, text in sorted(found)]


def source_files(root: Path) -> list[Path]:
    packages = ("common", "data_prep", "llmrec", "recipes", "benchmarks", "scripts")
    return sorted(
        p for package in packages if (root / package).is_dir() for p in (root / package).rglob("*.py")
    )


def test_no_module_outside_the_head_compares_the_head_options():
    violations = [
        f"{path.relative_to(REPO)}:{found}"
        for path in source_files(REPO)
        if path.relative_to(REPO).as_posix() not in ALLOWED
        for found in option_comparisons(path)
    ]
    assert not violations, "ask the item head (llmrec.head.ItemHead) instead:\n" + "\n".join(violations)


def test_the_option_check_sees_comparisons(tmp_path, monkeypatch):
    probe = tmp_path / "llmrec" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(
        "def f(model, saved, name):\n"
        "    if model.config.prior != 'none':\n"  # 2
        "        pass\n"
        "    a = saved['model']['head'] == 'untied'\n"  # 4
        "    b = getattr(model.config, 'history_pool') in ('mean',)\n"  # 5
        "    c = name == 'tied'\n"  # 6
        "    d = model.head.untied and model.prior is None and name == 'none'\n"  # fine
        "    return a, b, c, d\n"
    )
    assert [line.split(":")[0] for line in option_comparisons(probe)] == ["2", "4", "5", "6"]
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "REPO", tmp_path)
    with pytest.raises(AssertionError, match=r"llmrec/probe.py:2: model.config.prior != 'none'"):
        test_no_module_outside_the_head_compares_the_head_options()


# ---------------------------------------------------------------------------------- the module
def tiny(**overrides) -> CLLM4Rec:
    return CLLM4Rec.from_config(
        ModelConfig(lora_r=4, max_doc_tokens=32, **overrides), BackboneConfig("tiny-llama"), N_USERS, N_ITEMS
    )


def prompt_args(model: CLLM4Rec) -> tuple[torch.Tensor, ...]:
    prompts = FinetunePrompts(model.vocab, model.tokenizer, "<user_{user}> saw {history}, next", 64)
    histories = [[1, 4, 7], [2, 3], [0, 5, 6, 9, 11]]
    batch = prompt_batch([prompts.encode(u, h) for u, h in enumerate(histories)], pad_token_id=0)
    history = torch.tensor([h + [-1] * (5 - len(h)) for h in histories])
    return batch["input_ids"], batch["attention_mask"], history


def full_model(prior_weight: float = 0.25) -> CLLM4Rec:
    """Untied head, pool and prior, every part away from its initial value."""
    model = tiny(head="untied", history_pool="mean", prior="ease", prior_weight=prior_weight)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.head.bias.normal_(generator=generator)
        model.head.weight.add_(torch.randn(model.head.weight.shape, generator=generator))
        model.head.pool_scale.fill_(1.7)
    model.head.fit_prior(torch.randn(N_ITEMS, N_ITEMS, generator=generator))
    return model.eval()


def test_the_head_is_built_from_its_options():
    table = torch.randn(N_ITEMS, 8)
    tied = ItemHead(ModelConfig(), table)
    assert not tied.untied and not tied.pooled and not tied.has_prior and tied.linear
    assert list(tied.state_dict()) == [] and tied.blend_weight == 0.0
    assert tied.product(table)[0] is table and tied.rows(table).shape == (N_ITEMS, 0)
    full = ItemHead(ModelConfig(head="untied", history_pool="mean", prior="ease", prior_weight=0.5), table)
    assert full.untied and full.pooled and full.has_prior and not full.linear
    assert list(full.state_dict()) == ["weight", "bias", "pool_scale", "prior_weight", "prior.matrix"]
    assert (
        full.blend_weight == 0.5
        and torch.equal(full.weight, table)
        and full.rows(table).shape == (N_ITEMS, 9)
    )
    with pytest.raises(ValueError, match="unknown head 'wide'"):
        ItemHead(ModelConfig(head="wide"), table)
    with pytest.raises(ValueError, match="no prior"):
        tied.set_prior_weight(1.0)


def test_reconfigure_adds_parts_and_refuses_the_rest():
    table = torch.randn(N_ITEMS, 8)
    head = ItemHead(ModelConfig(history_pool="mean"), table)
    head.reconfigure(ModelConfig(head="untied", history_pool="mean", prior="ease", prior_weight=2.0), table)
    assert head.untied and head.pooled and head.blend_weight == 2.0
    # parameters register in the order they were added, as they did on the model before the head
    assert [name for name, _ in head.named_parameters()] == ["pool_scale", "weight", "bias"]
    for change, message in [
        (dict(head="tied"), "cannot change the item head from 'untied' to 'tied'"),
        (dict(head="untied", history_pool="none"), "cannot change history_pool from 'mean' to 'none'"),
        (dict(head="untied", history_pool="mean", prior="none"), "cannot change prior from 'ease' to 'none'"),
    ]:
        with pytest.raises(ValueError, match=message):
            head.reconfigure(ModelConfig(**change), table)


def test_the_head_leads_the_models_parameters_as_its_tensors_did():
    """Optimizer groups (and the order of their state in a checkpoint, and of gradient clipping's sum)
    list the head's parameters first, where the model's own head_weight/head_bias/pool_scale were."""
    model = tiny(head="untied", history_pool="mean")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names[:3] == ["head.weight", "head.bias", "head.pool_scale"]
    _, tables = model.param_groups(1e-3, 1e-2)
    assert tables["params"][:3] == [model.head.weight, model.head.bias, model.head.pool_scale]


def test_blend_and_choice_of_the_prior_weight():
    head = ItemHead(ModelConfig(prior="ease"), torch.randn(N_ITEMS, 8))
    logits, prior = torch.randn(3, N_ITEMS), torch.randn(3, N_ITEMS)
    assert torch.equal(head.blend(logits, prior), blend_scores(logits, prior, 0.0))
    target = blend_scores(logits, prior, 1.5)
    weight, grid = head.choose_prior_weight(logits, prior, lambda s: -float((s - target).abs().sum()))
    assert weight == 1.5 and list(grid) == list(PRIOR_WEIGHTS) and head.blend_weight == 1.5
    assert torch.equal(head.blend(logits, prior), target)


def test_rows_grow_and_set_for_cold_items():
    table = torch.randn(N_ITEMS, 8)
    head = ItemHead(ModelConfig(head="untied", prior="ease"), table)
    head.fit_prior(torch.randn(N_ITEMS, N_ITEMS))
    matrix = head.prior.matrix.clone()
    head.grow(2)
    assert head.weight.shape == (N_ITEMS + 2, 8) and head.bias.shape == (N_ITEMS + 2,)
    assert (
        torch.equal(head.prior.matrix[:N_ITEMS, :N_ITEMS], matrix) and not head.prior.matrix[N_ITEMS:].any()
    )
    rows = torch.randn(2, 9)
    head.set_rows(torch.tensor([N_ITEMS, N_ITEMS + 1]), rows)
    assert torch.equal(head.rows(table)[N_ITEMS:], rows)
    like = head.rows_like(rows[:, :8], head.rows(table)[:N_ITEMS])
    assert torch.equal(like[:, :8], rows[:, :8]) and torch.allclose(like[:, 8], head.bias[:N_ITEMS].mean())


# ---------------------------------------------------------------------------------- saved weights
def legacy_file(path: Path) -> None:
    """Rewrite trained weights as llmrec <= 0.2 saved them: the head's tensors under the model's own names,
    no blend weight (it lived in the config)."""
    renamed = {f"head.{new}": old for old, new in LEGACY_NAMES.items()}
    state = load_file(str(path))
    save_file({renamed.get(k, k): v for k, v in state.items() if k != "head.prior_weight"}, str(path))


def test_a_fresh_model_directory_saves_the_head_under_its_names_and_loads_back(tmp_path):
    model = full_model()
    model.save_pretrained(tmp_path / "m")
    names = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert {"head.weight", "head.bias", "head.pool_scale", "head.prior.matrix", "head.prior_weight"} <= names
    assert not names & set(LEGACY_NAMES)
    again = CLLM4Rec.from_pretrained(tmp_path / "m").eval()
    args = prompt_args(model)
    with torch.no_grad():
        assert torch.equal(again.score_items(*args), model.score_items(*args))


def test_a_model_directory_with_the_old_names_and_its_weight_in_the_config_loads(tmp_path):
    model = full_model(prior_weight=0.25)
    model.save_pretrained(tmp_path / "m")
    legacy_file(tmp_path / "m" / "model.safetensors")
    assert set(LEGACY_NAMES) <= set(load_file(str(tmp_path / "m" / "model.safetensors")))
    again = CLLM4Rec.from_pretrained(tmp_path / "m").eval()
    assert again.head.blend_weight == 0.25
    args = prompt_args(model)
    with torch.no_grad():
        assert torch.equal(again.score_items(*args), model.score_items(*args))
    # saving it again writes the new names, blend weight included
    again.save_pretrained(tmp_path / "m2")
    assert "head.prior_weight" in load_file(str(tmp_path / "m2" / "model.safetensors"))


def test_the_0_1_0_bundle_keeps_its_old_names_and_loads():
    assert {"head_weight", "head_bias"} <= set(load_file(str(FIXTURE / "bundle" / WEIGHTS_FILE)))
    recommender = Recommender.from_pretrained(FIXTURE / "bundle", device="cpu")
    assert recommender.model.head.untied and recommender.model.head.linear
    # the scores themselves: tests/test_recommender.py, test_a_bundle_exported_by_llmrec_0_1_loads...


def test_a_bundle_with_its_prior_weight_in_the_config_loads(data, tmp_path):  # noqa: F811
    from data_prep import load_bundle
    from llmrec.export import export_model

    b = load_bundle(data)
    model = CLLM4Rec.from_config(
        ModelConfig(lora_r=2, head="untied", history_pool="mean", prior="ease", prior_weight=0.0),
        BackboneConfig("tiny-llama"),
        b.n_users,
        b.n_items,
    )
    model.head.fit_prior(torch.randn(b.n_items, b.n_items, generator=torch.Generator().manual_seed(0)))
    model.head.set_prior_weight(0.75)  # chosen after training: state, not config
    bundle = export_model(model, b, tmp_path / "bundle", mapper=False)
    expected = Recommender.from_pretrained(bundle, device="cpu").score_batch(b.user_ids)
    # as llmrec <= 0.2 wrote it: old names, the chosen weight in config.json's model section
    legacy_file(bundle / WEIGHTS_FILE)
    config = json.loads((bundle / CONFIG_FILE).read_text())
    config["model"]["prior_weight"] = 0.75
    config["files"] = file_records(bundle, exclude=CONFIG_FILE)
    config["checksum"] = config_checksum(config)
    (bundle / CONFIG_FILE).write_text(json.dumps(config))
    old = Recommender.from_pretrained(bundle, device="cpu")
    assert old.model.head.blend_weight == 0.75
    assert torch.equal(old.score_batch(b.user_ids), expected)


# ---------------------------------------------------------------------------------- the run's record
def test_the_runs_weight_applies_to_the_model_it_was_chosen_for_only(tmp_path, caplog):
    run = tmp_path / "run"
    full_model(prior_weight=0.0).save_pretrained(run / "best")
    assert run_prior_weight(run) is None and run_model(run).head.blend_weight == 0.0
    write_prior_weight(run, run / "best", 3.0, {"ndcg@10": {"3.0": 0.5}})
    assert run_prior_weight(run) == 3.0 and run_model(run).head.blend_weight == 3.0
    # a record written before this one (no sha256): the weight is in the model's config already
    record = json.loads((run / PRIOR_FILE).read_text())
    (run / PRIOR_FILE).write_text(json.dumps({k: v for k, v in record.items() if k != "model_sha256"}))
    assert run_prior_weight(run) is None
    # training went on after the choice: the model keeps its own weight, and a warning says why
    (run / PRIOR_FILE).write_text(json.dumps(record))
    trained_on = full_model(prior_weight=0.0)
    with torch.no_grad():
        trained_on.head.bias.add_(1.0)
    trained_on.save_pretrained(run / "best")
    model = run_model(run)
    with caplog.at_level(logging.WARNING, logger="llmrec.model"):
        assert run_prior_weight(run) is None
    assert model.head.blend_weight == 0.0 and "chosen for an earlier" in caplog.text
    np.testing.assert_equal(record["valid"], {"ndcg@10": {"3.0": 0.5}})
