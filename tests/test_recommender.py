"""Export bundles and the Recommender API on a tiny finetuned run (tiny-llama, a 30-user synthetic dataset)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_trainable, recipe_main
from safetensors.torch import load_file

from data_prep import load_bundle
from data_prep.build import BuildConfig, build
from llmrec.backbone import BackboneConfig, load_backbone
from llmrec.bundle import BundleError, config_checksum
from llmrec.export import cold_template, export_model, export_run
from llmrec.metrics import RankingMetrics, evaluate_scorer
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.pipeline import scorer_for
from llmrec.recommender import Recommender
from llmrec.run import run_model_dir

REPO = Path(__file__).resolve().parents[1]


class Precomputed:
    """Scores of every user computed beforehand, as a `llmrec.metrics.Scorer`."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores

    def score(self, users: np.ndarray) -> torch.Tensor:
        return self.scores[torch.as_tensor(users)]


N_USERS, N_ITEMS, PER_USER = 30, 40, 12


def recipe(name: str):
    return recipe_main(name)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small implicit-feedback log with popularity skew and titled items, split 80/10/10 per user."""
    root = tmp_path_factory.mktemp("export-data")
    rng = np.random.default_rng(0)
    popularity = 1.0 / np.arange(1, N_ITEMS + 1)
    rows = ["user_id,item_id,timestamp"]
    for user in range(N_USERS):
        items = rng.choice(N_ITEMS, PER_USER, replace=False, p=popularity / popularity.sum())
        rows += [f"u{user},m{item},{user * 100 + t}" for t, item in enumerate(items)]
    (root / "log.csv").write_text("\n".join(rows) + "\n")
    titles = ["item_id,title"] + [f"m{i},Movie number {i}" for i in range(N_ITEMS)]
    (root / "items.csv").write_text("\n".join(titles) + "\n")
    config = BuildConfig(
        format="csv",
        input=str(root / "log.csv"),
        item_meta=str(root / "items.csv"),
        out=str(root / "bundle"),
        time_col="timestamp",
        seed=0,
    )
    return build(config)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-run") / "run"
    argv = ["--data", str(data), "--name_or_path", "tiny-llama", "--lora_r", "4", "--output_dir", str(out)]
    recipe("finetune")([*argv, "--max_steps", "3", "--batch_size", "8", "--epochs", "1", "--lr", "0.01"])
    return out


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory) -> Path:
    return export_run(run, tmp_path_factory.mktemp("export") / "bundle", merge=True)


@pytest.fixture(scope="module")
def recommender(bundle) -> Recommender:
    return Recommender.from_pretrained(bundle, device="cpu")


FRESH_PROCESS = """
import json, sys
from safetensors.torch import save_file
from llmrec import Recommender
rec = Recommender.from_pretrained(sys.argv[1], device="cpu")
save_file({"scores": rec.score_batch(rec.catalogue.user_ids)}, sys.argv[2])
lists = rec.recommend_batch(rec.catalogue.user_ids, k=10)
json.dump([[[r.item, r.score] for r in top] for top in lists], open(sys.argv[3], "w"))
"""


def test_fresh_process_gives_the_runs_own_scores_rankings_and_metrics(run, bundle, data, tmp_path):
    scores_file, lists_file = tmp_path / "scores.safetensors", tmp_path / "lists.json"
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(bundle), str(scores_file), str(lists_file)],
        check=True,
        cwd=REPO,
    )
    scores = load_file(str(scores_file))["scores"]
    lists = json.loads(lists_file.read_text())

    b = load_bundle(data)
    expected = scorer_for(b, CLLM4Rec.from_pretrained(run_model_dir(run))).score(np.arange(b.n_users))
    assert scores.shape == (N_USERS, N_ITEMS)
    assert torch.allclose(scores, expected, atol=1e-5, rtol=0)

    seen = torch.as_tensor(b.matrix("train").toarray(), dtype=torch.bool)
    top = RankingMetrics(N_ITEMS, ks=(10,)).topk(expected.masked_fill(seen, float("-inf")), 10)
    for user in range(N_USERS):
        assert [item for item, _ in lists[user]] == [b.item_ids[i] for i in top[user].tolist()]
        assert np.allclose([s for _, s in lists[user]], expected[user, top[user]].numpy(), atol=1e-5, rtol=0)

    # the run's own evaluation (recipes/evaluate.py) and the bundle's scores give the same test metrics
    metrics = recipe("evaluate")(["--run", str(run), "--split", "test"])
    again = evaluate_scorer(Precomputed(scores), b, "test", progress=False)
    assert metrics["users"] > 0 and set(again) <= set(metrics)
    for key, value in again.items():
        assert value == pytest.approx(metrics[key], abs=1e-9), key


def test_merged_export_loads_with_plain_transformers_and_gives_the_same_scores(bundle, recommender):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = bundle / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    head = load_file(str(merged / "item_head.safetensors"))
    template = json.loads((merged / "recommender.json").read_text())["templates"]["user"]
    vocab = recommender.model.vocab
    for user in (0, 7, N_USERS - 1):
        history = " ".join(f"<item_{i}>" for i in recommender.histories[user])
        text = template.format(user=user, history=history)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == vocab.encode(text, recommender.model.tokenizer)  # ID tokens are real added tokens now
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        scores = hidden @ head["weight"].T + head["bias"]
        assert torch.allclose(
            scores, recommender.score(recommender.catalogue.user_ids[user]), atol=1e-5, rtol=0
        )


def test_bundle_holds_no_pickle_and_records_what_it_needs(bundle, recommender):
    for path in bundle.rglob("*"):
        if path.is_file():
            assert path.suffix in {".json", ".safetensors", ".jinja", ".txt", ".md"}, path
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle/torch.save file"
    config = json.loads((bundle / "config.json").read_text())
    assert config["backbone"]["config"]["name_or_path"] == "tiny-llama" and config["backbone"]["fingerprint"]
    assert config["vocab"]["n_users"] == N_USERS and config["vocab"]["n_items"] == N_ITEMS
    assert config["head"] == "tied" and config["adapters"] == ["collab"]
    assert config["templates"]["cold"] == "has interacted with {history}, will interact with"
    assert (bundle / "adapter" / "collab" / "adapter_model.safetensors").is_file()
    assert set(load_file(str(bundle / "weights.safetensors"))) == {
        f"{view}.tables.{family}.weight" for view in ("collab", "content") for family in ("user", "item")
    }
    assert recommender.history("u0") == [recommender.catalogue.item_ids[i] for i in recommender.histories[0]]


def test_recommend_known_user_excludes_seen_items_and_carries_titles(recommender):
    user = recommender.catalogue.user_ids[3]
    seen = set(recommender.history(user))
    top = recommender.recommend(user, k=5)
    assert len(top) == 5 and not seen & {r.item for r in top}
    assert all(r.title == f"Movie number {r.item[1:]}" for r in top)
    assert [r.score for r in top] == sorted((r.score for r in top), reverse=True)
    scores = recommender.score(user)
    assert top[0].score == pytest.approx(float(scores[top[0].index]))
    everything = recommender.recommend(user, k=N_ITEMS + 5, exclude_seen=False)
    assert len(everything) == N_ITEMS  # k is capped by the catalogue
    fewer = recommender.recommend(user, k=5, exclude=[top[0].item])
    assert top[0].item not in {r.item for r in fewer} and fewer[0].item == top[1].item


def test_ids_and_titles_map_score_columns_and_rows_and_are_read_only(recommender):
    users, items, titles = recommender.user_ids, recommender.item_ids, recommender.item_titles
    assert len(users) == recommender.n_users and len(items) == len(titles) == recommender.n_items
    assert [recommender.user(u) for u in users[:3]] == [0, 1, 2] and recommender.items(items[:3]) == [0, 1, 2]
    top = recommender.recommend(users[1], k=3)
    assert [(r.item, r.title) for r in top] == [(items[r.index], titles[r.index]) for r in top]
    scores = recommender.score_batch(users=[users[1]])[0]
    assert items[int(scores.argmax())] in {
        r.item for r in recommender.recommend(users[1], k=1, exclude_seen=False)
    }
    with pytest.raises(AttributeError):
        recommender.item_ids = ()
    with pytest.raises(TypeError):
        recommender.item_ids[0] = "changed"  # a tuple: the catalogue cannot be changed through it


def test_names_removed_since_0_1_still_work_with_a_deprecation_warning(recommender):
    with pytest.deprecated_call(match="Recommender.user_index is deprecated"):
        assert recommender.user_index[recommender.user_ids[2]] == 2
    with pytest.deprecated_call(match="Recommender.item_index is deprecated"):
        assert recommender.item_index[recommender.item_ids[4]] == 4


def test_recommend_for_an_unseen_user_uses_the_cold_prompt(recommender):
    history = ["m1", "m5", "m9"]
    top = recommender.recommend(history=history, k=4)
    assert len(top) == 4 and not {r.item for r in top} & set(history)
    items = recommender.items(history)
    text = f"has interacted with <item_{items[0]}> <item_{items[1]}> <item_{items[2]}>, will interact with"
    assert recommender.cold_prompts.encode(0, items) == recommender.model.vocab.encode(
        text, recommender.model.tokenizer
    )
    batch = recommender.score_batch(histories=[history, ["m2"]])
    assert torch.allclose(batch[0], recommender.score(history=history), atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_recommend_recipe_prints_titles(bundle, recommender, capsys):
    user = recommender.catalogue.user_ids[2]
    items = recipe("recommend")(["--bundle", str(bundle), "--user", user, "-k", "3", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert f"Top 3 for user {user}" in printed and len(items) == 3
    assert all(r.title in printed and r.item in printed for r in items)


def test_unknown_ids_and_empty_histories_fail_clearly(recommender):
    with pytest.raises(ValueError, match=r"unknown user id 'nobody'.*pass history="):
        recommender.recommend("nobody")
    with pytest.raises(ValueError, match=r"unknown item id 'nope' at position 1"):
        recommender.recommend(history=["m1", "nope"])
    with pytest.raises(ValueError, match=r"history 0 is empty"):
        recommender.recommend(history=[])
    with pytest.raises(ValueError, match=r"give user .* or history .*, not both"):
        recommender.recommend("u1", history=["m1"])
    with pytest.raises(ValueError, match=r"k must be a positive"):
        recommender.recommend("u1", k=0)


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def edit_config(path: Path, change, keep_checksum: bool = False) -> None:
    config = json.loads((path / "config.json").read_text())
    change(config)
    if keep_checksum:  # a crafted bundle that passes the edit check
        config["checksum"] = config_checksum(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda b: edit_config(b, lambda c: c.update(format_version=3)),
            r"format_version 3 .* reads format_version 1 \(item head\) and 2 \(semantic-ID generator\): "
            r"re-export the run with llmrec 0\.\d+\.\d+",
        ),
        (
            lambda b: edit_config(b, lambda c: c["model"].update(max_doc_tokens=8)),
            r"config.json: edited after export",
        ),
        (
            lambda b: (b / "config.json").write_text('{"format": '),
            r"config.json: bundle config is not valid JSON",
        ),
        (lambda b: (b / "config.json").unlink(), r"config.json: missing; not a recommender bundle"),
        (lambda b: edit_config(b, lambda c: c.pop("files")), r"missing key\(s\) \['files'\]"),
        (
            lambda b: (b / "weights.safetensors").write_bytes(
                (b / "weights.safetensors").read_bytes()[:5000]
            ),
            r"weights.safetensors: 5000 bytes, config.json records \d+: truncated",
        ),
        (
            lambda b: (b / "histories.safetensors").write_bytes(
                (b / "histories.safetensors").read_bytes()[:-1] + b"\x7f"
            ),
            r"histories.safetensors: content differs .*: corrupted",
        ),
        (
            lambda b: (b / "adapter" / "collab" / "adapter_model.safetensors").unlink(),
            r"adapter_model.safetensors: missing \(listed in config.json\)",
        ),
        (
            lambda b: edit_config(b, lambda c: c["backbone"]["config"].update(trust_remote_code=True), True),
            r"needs trust_remote_code=True",
        ),
        (
            lambda b: edit_config(b, lambda c: c["vocab"].update(n_items=N_ITEMS + 1), True),
            r"items.json: 40 raw_ids but the model's vocabulary says 41",
        ),
    ],
    ids=[
        "version",
        "edited",
        "bad-json",
        "no-config",
        "no-key",
        "truncated",
        "corrupted",
        "missing-file",
        "remote-code",
        "sizes",
    ],
)
def test_damaged_bundles_fail_clearly(bundle, tmp_path, damage, message):
    copy = copy_bundle(bundle, tmp_path)
    damage(copy)
    with pytest.raises(BundleError, match=message):
        Recommender.from_pretrained(copy, device="cpu")


def test_a_different_backbone_checkpoint_is_refused(data, tmp_path):
    lm, tokenizer = load_backbone("tiny-llama")
    checkpoint = tmp_path / "backbone"
    lm.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    b = load_bundle(data)
    model = CLLM4Rec.from_config(ModelConfig(lora_r=2), BackboneConfig(str(checkpoint)), b.n_users, b.n_items)
    out = export_model(model, b, tmp_path / "bundle", dtype="fp16")
    assert load_file(str(out / "weights.safetensors"))["collab.tables.item.weight"].dtype == torch.float16
    loaded = Recommender.from_pretrained(out, device="cpu")
    expected = model.score_items(*_prompt(model, loaded))
    assert torch.allclose(loaded.score("u0"), expected[0], atol=5e-3)  # fp16 weights, fp32 compute

    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    with pytest.raises(
        BundleError, match=r"backbone .* \(local, fingerprint \w+\) is not the one the bundle"
    ):
        Recommender.from_pretrained(out, device="cpu")
    with pytest.raises(Exception, match=r"already exists"):
        export_model(model, b, out)


def _prompt(model: CLLM4Rec, recommender: Recommender) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([recommender.prompts.encode(0, recommender.histories[0])])
    model.eval()
    return ids, torch.ones_like(ids)


def test_export_refuses_a_dataset_of_another_size(data, tmp_path):
    model = CLLM4Rec.from_config(ModelConfig(lora_r=2), BackboneConfig("tiny-llama"), N_USERS + 1, N_ITEMS)
    with pytest.raises(ValueError, match=r"31 users .* has 30"):
        export_model(model, load_bundle(data), tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_cold_template_drops_user_placeholders():
    assert cold_template("<user_{user}> has interacted with {history}, <user_{user}> will interact with") == (
        "has interacted with {history}, will interact with"
    )
    assert cold_template("User <user_{user}> watched {history}. Next:") == "User watched {history}. Next:"
    with pytest.raises(ValueError, match=r"must contain \{history\}"):
        cold_template("<user_{user}> likes things")


def test_histories_are_the_evaluation_histories(data, recommender):
    expected = load_bundle(data).histories("train")
    assert [list(h) for h in recommender.histories] == expected


def test_untied_head_and_one_adapter_per_view_round_trip(data, tmp_path):
    b = load_bundle(data)
    config = ModelConfig(lora_r=2, lora_per_view=True, head="untied")
    model = CLLM4Rec.from_config(config, BackboneConfig("tiny-llama"), b.n_users, b.n_items, seed=1)
    perturb_trainable(model)
    out = export_model(model, b, tmp_path / "bundle")
    assert json.loads((out / "config.json").read_text())["adapters"] == ["collab", "content"]
    loaded = Recommender.from_pretrained(out, device="cpu")
    assert loaded.model.config == config
    expected = model.score_items(*_prompt(model, loaded))[0]
    assert torch.allclose(loaded.score(loaded.catalogue.user_ids[0]), expected, atol=1e-5, rtol=0)
    assert loaded.score_batch([]).shape == (0, N_ITEMS)


@pytest.mark.parametrize("table", ["none", "hashed", "lowrank"])
def test_user_tables_without_a_row_per_user_export_and_serve_known_users(data, tmp_path, table):
    b = load_bundle(data)
    config = ModelConfig(lora_r=2, user_table=table, user_buckets=7, user_rank=3, history_pool="mean")
    model = CLLM4Rec.from_config(config, BackboneConfig("tiny-llama"), b.n_users, b.n_items, seed=1)
    perturb_trainable(model)
    model.eval()
    expected = scorer_for(b, model).score(np.arange(b.n_users))
    loaded = Recommender.from_pretrained(export_model(model, b, tmp_path / "bundle"), device="cpu")
    assert loaded.model.config == config
    assert type(loaded.model.collab.tables["user"]) is type(model.collab.tables["user"])
    assert torch.allclose(loaded.score_batch(loaded.catalogue.user_ids), expected, atol=1e-5, rtol=0)
    assert len(loaded.recommend(loaded.catalogue.user_ids[0], k=5)) == 5
    if table == "none":  # a user is its history: the same history under another user's token scores alike
        history = loaded.histories[0]
        ids = [torch.tensor([loaded.prompts.encode(user, history)]) for user in (0, 1)]
        first, second = (loaded.model.score_items(i, torch.ones_like(i)) for i in ids)
        assert torch.equal(first, second)


@pytest.mark.slow
def test_smollm2_bundle_and_merged_model_agree(ml100k_bundle, tmp_path):
    """The real tokenizer and tied 135M backbone (truncated to 2 layers): merged scores = bundle scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    b = load_bundle(ml100k_bundle)
    backbone = BackboneConfig("smollm2-135m", num_layers=2)
    model = CLLM4Rec.from_config(ModelConfig(), backbone, b.n_users, b.n_items, b.item_titles)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    out = export_model(model, b, tmp_path / "bundle", merge=True)
    recommender = Recommender.from_pretrained(out, device="cpu")
    assert [r.item for r in recommender.recommend("196", k=10)]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    head = load_file(str(out / "merged" / "item_head.safetensors"))
    for user in ("196", "1"):
        index = recommender.user(user)
        history = " ".join(f"<item_{i}>" for i in recommender.histories[index])
        text = b.templates.finetune.format(user=index, history=history)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == recommender.prompts.encode(index, recommender.histories[index])
        with torch.no_grad():
            hidden = merged(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        scores = hidden @ head["weight"].T + head["bias"]
        assert torch.allclose(scores, recommender.score(user), atol=1e-5, rtol=1e-5)


FIXTURE = REPO / "tests" / "fixtures" / "bundle-0.1.0"  # written by llmrec 0.1.0 (make_fixture.py)


def test_a_bundle_exported_by_llmrec_0_1_loads_and_scores_as_it_did(tmp_path):
    recommender = Recommender.from_pretrained(FIXTURE / "bundle", device="cpu")
    expected = load_file(str(FIXTURE / "scores.safetensors"))
    scores = recommender.score_batch(recommender.catalogue.user_ids)
    assert torch.allclose(scores, expected["scores"], atol=1e-5, rtol=0)
    cold = recommender.score_batch(histories=[["m1", "m2"], ["m5"]])
    assert torch.allclose(cold, expected["cold"], atol=1e-5, rtol=0)
    # a format this version cannot read names the version to re-export with
    bundle = copy_bundle(FIXTURE / "bundle", tmp_path)
    edit_config(bundle, lambda c: c.update(format_version=0))
    with pytest.raises(BundleError, match=r"re-export the run with llmrec 0\.2\.0 \(format_version 1"):
        Recommender.from_pretrained(bundle, device="cpu")


def encoded_batches(monkeypatch) -> list[int]:
    """How many texts each call of the sentence encoder gets, from now on."""
    from llmrec.indexing import encoders

    sizes, encode = [], encoders.mean_pooled_embeddings
    monkeypatch.setattr(
        encoders,
        "mean_pooled_embeddings",
        lambda m, t, texts, **kw: sizes.append(len(texts)) or encode(m, t, texts, **kw),
    )
    return sizes


def test_export_fits_the_mapper_so_add_items_encodes_only_the_new_texts(bundle, data, monkeypatch):
    from llmrec.coldstart import warm_items
    from llmrec.indexing.encoders import item_embeddings
    from llmrec.mapper import TextToID, item_texts

    rec = Recommender.from_pretrained(bundle, device="cpu")
    b = load_bundle(data)
    warm = warm_items(b.matrix("train"), b.n_items)
    expected = TextToID.fit(rec.model, item_embeddings(item_texts(b.item_titles, b.item_text)), warm)
    assert rec.mapper is not None and rec.mapper.encoder == "minilm"
    assert torch.allclose(rec.mapper.ridge.weight, expected.ridge.weight, atol=1e-5)
    mapper, sizes = rec.mapper, encoded_batches(monkeypatch)
    rec.add_items([{"id": "new1", "title": "A film"}, {"id": "new2", "title": "Another film"}])
    rec.add_items([{"id": "new3", "title": "A third film"}])
    assert sizes == [2, 1] and rec.mapper is mapper  # no refit: the warm texts are not encoded again


def test_a_bundle_without_mapper_fits_it_on_the_first_add_only(monkeypatch):
    rec = Recommender.from_pretrained(FIXTURE / "bundle", device="cpu")  # llmrec 0.1.0: no mapper
    assert rec.mapper is None
    sizes = encoded_batches(monkeypatch)
    rec.add_items([{"id": "new1", "title": "A film"}])
    rec.add_items([{"id": "new2", "title": "Another film"}])
    assert sizes == [rec.n_items - 2, 1, 1]  # every item of the bundle once, then only the new ones


def test_add_items_keeps_old_scores_and_ranks_new_items(bundle, tmp_path):
    rec = Recommender.from_pretrained(bundle, device="cpu")  # its own copy: adding items changes it
    users = rec.catalogue.user_ids[:5]
    before, cold_before = rec.score_batch(users), rec.score(history=["m1", "m2"])
    new = rec.add_items(
        [
            {"id": "new1", "title": "Movie number 3 returns", "text": "the sequel"},
            {"id": "new2", "title": "A film"},
        ]
    )
    assert new == [N_ITEMS, N_ITEMS + 1] and rec.n_items == N_ITEMS + 2
    after = rec.score_batch(users)
    assert after.shape == (5, N_ITEMS + 2)
    assert torch.allclose(after[:, :N_ITEMS], before, atol=1e-6, rtol=0)  # old items: scores unchanged
    assert torch.allclose(rec.score(history=["m1", "m2"])[:N_ITEMS], cold_before, atol=1e-6, rtol=0)
    assert torch.isfinite(after[:, N_ITEMS:]).all() and after[:, N_ITEMS].std() > 0  # ranked per user
    assert not torch.equal(after[:, N_ITEMS], after[:, N_ITEMS + 1])
    top = rec.recommend(history=["new1", "m1"], k=5)  # a new item inside a history
    assert len(top) == 5 and not {"new1", "m1"} & {r.item for r in top}
    pandas = pytest.importorskip("pandas")
    assert rec.add_items(pandas.DataFrame({"id": ["new3"], "title": ["Another film"]})) == [N_ITEMS + 2]
    with pytest.raises(ValueError, match=r"items\[0\]: field 'id': 'm1' is already in the catalogue"):
        rec.add_items([{"id": "m1", "title": "x"}])
    with pytest.raises(ValueError, match=r"items\[1\]: field 'title' is missing or empty"):
        rec.add_items([{"id": "a", "title": "A"}, {"id": "b"}])
    with pytest.raises(ValueError, match=r"items\[1\]: field 'id': 'a' repeats items\[0\]"):
        rec.add_items([{"id": "a", "title": "A"}, {"id": "a", "title": "B"}])
    assert rec.n_items == N_ITEMS + 3  # a refused batch adds nothing

    again = Recommender.from_pretrained(rec.save_pretrained(tmp_path / "grown"), device="cpu")
    assert (
        again.catalogue.item_ids == rec.catalogue.item_ids
        and again.catalogue.item_titles[-1] == "Another film"
    )
    assert torch.allclose(again.score_batch(users), rec.score_batch(users), atol=1e-5, rtol=0)
    assert again.add_items([{"id": "new4", "title": "One more"}]) == [N_ITEMS + 3]  # the saved mapper
