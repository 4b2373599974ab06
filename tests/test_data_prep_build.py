"""End to end on a hand-made log: exact bundle files and corpus text, the CLI, and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.placeholders import placeholder
from data_prep import DataError, Templates, load_bundle
from data_prep.__main__ import main
from data_prep.build import BuildConfig, build
from data_prep.corpora import collaborative_corpus, content_corpus, finetune_corpus, finetune_rng
from data_prep.splits import random_rank

INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "u1\ti1\t2\t90\n"  # duplicate of the next row, earlier: dropped
    "u1\ti1\t5\t100\n"
    "u1\ti4\t4\t120\n"
    "u1\ti2\t3\t200\n"
    "u1\ti3\t4\t300\n"
    "u2\ti4\t2\t50\n"
    "u2\ti2\t4\t150\n"
    "u3\ti1\t1\t10\n"
)
ITEMS = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "i1\tHeat\t1995\tAction Crime\n"
    "i2\tBabe\t\tChildren's\n"
    "i4\tFargo\t1996\tCrime Drama\n"
)
USERS = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\nu1\t24\tM\ttechnician\t1\nu2\t53\tF\tother\t2\n"


@pytest.fixture(autouse=True)
def restore_logging():
    """``main`` calls setup_logging(), which replaces the root handlers; put them back for later tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def source(tmp_path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "tiny.inter").write_text(INTER)
    (d / "tiny.item").write_text(ITEMS)
    (d / "tiny.user").write_text(USERS)
    return d


def config(source: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(input=str(source), out=str(out), **{"format": "recbole", **kw})


def rows(dataset) -> list[tuple]:
    return [(r["kind"], r["user"], r["item"], r["prompt"], r["main"]) for r in dataset]


def test_hand_made_bundle_exact(source, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        out = build(config(source, tmp_path / "b", split="loo", finetune_keep=1.0))
    assert "1 of 4 items have no metadata" in caplog.text and "1 of 3 users have no metadata" in caplog.text
    b = load_bundle(out)
    assert b.user_ids == ["u1", "u2", "u3"] and b.item_ids == ["i1", "i2", "i3", "i4"]
    assert b.item_titles == ["Heat (1995)", "Babe", "i3", "Fargo (1996)"]
    assert b.user_text == ["24-year-old male technician", "53-year-old female", ""]
    # loo: u1 (i1@100, i4@120, i2@200, i3@300) -> train i1 i4, valid i2, test i3; u2 -> train i4, test i2
    assert b.interactions("train")[["user", "item"]].values.tolist() == [[0, 0], [0, 3], [1, 3], [2, 0]]
    assert b.interactions("valid")[["user", "item"]].values.tolist() == [[0, 1]]
    assert b.interactions("test")[["user", "item"]].values.tolist() == [[0, 2], [1, 1]]
    assert b.interactions("train")["rating"].tolist() == [5.0, 4.0, 2.0, 1.0]  # the latest duplicate kept
    assert b.matrix("test").toarray().tolist() == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert rows(b.corpus("collaborative")) == [
        ("collaborative", 0, -1, "<user_0> has interacted with", "<item_0> <item_3>"),
        ("collaborative", 1, -1, "<user_1> has interacted with", "<item_3>"),
        ("collaborative", 2, -1, "<user_2> has interacted with", "<item_0>"),
    ]
    assert rows(b.corpus("content")) == [
        ("item", -1, 0, "<item_0> is described as:", "Heat (1995); genres: Action, Crime"),
        ("item", -1, 1, "<item_1> is described as:", "Babe; genres: Children's"),
        ("item", -1, 3, "<item_3> is described as:", "Fargo (1996); genres: Crime, Drama"),
        ("user", 0, -1, "<user_0> is described as:", "24-year-old male technician"),
        ("user", 1, -1, "<user_1> is described as:", "53-year-old female"),
    ]
    assert rows(b.corpus("finetune"))[0] == (
        "finetune",
        0,
        -1,
        "<user_0> has interacted with <item_0> <item_3>, <user_0> will interact with",
        "<item_0> <item_3>",
    )
    m = b.manifest
    assert m["counts"] == {
        "users": 3,
        "items": 4,
        "train": 4,
        "valid": 1,
        "test": 2,
        "corpus_collaborative": 3,
        "corpus_content": 5,
        "corpus_finetune": 3,
    }
    assert m["split"] == {"protocol": "loo", "seed": None}
    assert m["filters"] == {"rating_threshold": None, "k_core": 0, "duplicates_removed": 1}
    assert m["templates"] == Templates().to_dict()
    assert len(m["source"]["files"]) == 3 and all(len(h) == 64 for h in m["source"]["files"].values())
    assert sorted(p.name for p in out.iterdir()) == [
        "corpora",
        "items.tsv",
        "manifest.json",
        "splits",
        "users.tsv",
    ]
    assert (out / "items.tsv").read_text().splitlines()[:2] == [
        "index\traw_id\ttitle\ttext",
        "0\ti1\tHeat (1995)\tHeat (1995); genres: Action, Crime",
    ]


def test_finetune_mask_is_seeded_subset(tmp_path):
    d = tmp_path / "log"
    d.mkdir()
    lines = [f"u{u}\ti{i}\t{u * 100 + i}" for u in range(3) for i in range(20)]
    (d / "log.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(lines) + "\n")

    def finetune(seed: int, name: str) -> list[dict]:
        return list(load_bundle(build(config(d, tmp_path / name, seed=seed))).corpus("finetune"))

    first, again, other = finetune(0, "a"), finetune(0, "b"), finetune(1, "c")
    assert first == again and first != other
    for row in first:
        target = row["main"].split()
        history = row["prompt"].split(" has interacted with ")[1].split(",")[0].split()
        assert len(target) == 16 and len(history) == round(0.8 * 16)  # 20 interactions, 16 train
        assert set(history) <= set(target)
        assert history == [t for t in target if t in history]  # time order kept


def test_reviews_from_training_pairs_only(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user,item,ts,text\na,x,1,Loved it.\na,y,2,Held out.\nb,x,3,\n")
    out = build(
        BuildConfig(
            format="csv",
            input=str(log),
            out=str(tmp_path / "b"),
            split="loo",
            user_col="user",
            item_col="item",
            time_col="ts",
            text_col="text",
        )
    )
    assert rows(load_bundle(out).corpus("content")) == [
        ("review", 0, 0, "<user_0> writes the following review for <item_0>:", "Loved it.")
    ]


def test_templates_from_yaml(source, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("collaborative: 'User <user_{user}> bought'\n")
    b = load_bundle(build(config(source, tmp_path / "b", templates=str(path))))
    assert b.templates.collaborative == "User <user_{user}> bought"
    assert b.corpus("collaborative")[0]["prompt"] == "User <user_0> bought"
    path.write_text("collaborative: '<user_{usr}> bought'\n")
    with pytest.raises(DataError, match=r"unknown placeholder\(s\) \['usr'\]"):
        build(config(source, tmp_path / "c", templates=str(path)))
    assert Templates.history([3, 7]) == "<item_3> <item_7>"


def test_filters_and_random_protocol_in_manifest(source, tmp_path):
    b = load_bundle(build(config(source, tmp_path / "b", rating_threshold=3.0, k_core=1, seed=7)))
    assert b.manifest["split"] == {"protocol": "random", "seed": 7, "ratios": [0.8, 0.1, 0.1]}
    assert b.n_users == 2 and b.item_ids == ["i1", "i2", "i3", "i4"]  # u3 (rating 1) and u2's i4 (2) filtered
    assert sum(len(b.interactions(s)) for s in ("train", "valid", "test")) == 5


# ----------------------------------------------------------------------------------------------
# CLI and bad input: non-zero exit, one clear message, nothing half-written
# ----------------------------------------------------------------------------------------------
def test_cli_build_and_inspect(source, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert (
        main(["build", "--format", "recbole", "--input", str(source), "--out", str(out), "--split", "loo"])
        == 0
    )
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "users         3" in printed and "items         4" in printed
    assert "split sizes   train 4  valid 1  test 2" in printed
    assert "per user      min 1 / median 2 / max 4" in printed
    assert printed.count("prompt: ") == 3 + 3 + 3
    assert main(["build", "--format", "recbole", "--input", str(source), "--out", str(out)]) == 2  # exists


def assert_nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_cli_bad_input_exits_nonzero_without_output(source, tmp_path, capsys):
    (source / "tiny.inter").write_text(INTER.replace("u2\ti2\t4\t150", "u2\ti2\t4\tnoon"))
    out = tmp_path / "bundle"
    assert main(["build", "--input", str(source), "--out", str(out)]) == 2
    # setup_logging() replaces the root handlers, so the message is read from stderr
    assert (
        f"{source / 'tiny.inter'}, line 8, field 'timestamp': not a number: 'noon'" in capsys.readouterr().err
    )
    assert_nothing_written(tmp_path, "bundle")


def test_unknown_format(source, tmp_path, capsys):
    assert main(["build", "--format", "xml", "--input", str(source), "--out", str(tmp_path / "b")]) == 2
    assert (
        "--format: must be one of ['recbole', 'movielens', 'amazon', 'csv'], got 'xml'"
        in capsys.readouterr().err
    )
    with pytest.raises(DataError, match="unknown format 'xml'"):
        build(config(source, tmp_path / "b", format="xml"))
    assert main(["frobnicate"]) == 2


def test_metadata_for_unknown_item(source, tmp_path):
    (source / "tiny.item").write_text(ITEMS + "i9\tGhost\t2000\tDrama\n")
    with pytest.raises(DataError, match="metadata for item 'i9', which has no interactions") as info:
        build(config(source, tmp_path / "b"))
    assert (info.value.file, info.value.line, info.value.field) == (str(source / "tiny.item"), 5, "item")
    assert_nothing_written(tmp_path, "b")


def write_presplit(d: Path, parts: dict[str, str]) -> Path:
    d.mkdir()
    for name, body in parts.items():
        (d / f"{name}.tsv").write_text("user_id\titem_id\trating\ttimestamp\n" + body)
    return d


def test_presplit_user_without_training(source, tmp_path):
    split = write_presplit(
        tmp_path / "split",
        {"train": "u1\ti1\t5\t1\n", "valid": "u1\ti2\t3\t2\n", "test": "u1\ti3\t3\t3\nu2\ti4\t1\t4\n"},
    )
    with pytest.raises(DataError, match="user 'u2' has no training interaction") as info:
        build(config(source, tmp_path / "b", split="presplit", presplit=str(split)))
    assert (info.value.file, info.value.line, info.value.field) == (str(split / "test.tsv"), 3, "user_id")
    with pytest.raises(DataError, match="cannot be filtered"):
        build(config(source, tmp_path / "b", split="presplit", presplit=str(split), k_core=5))
    assert_nothing_written(tmp_path, "b")


def test_presplit_bundle(source, tmp_path):
    split = write_presplit(
        tmp_path / "split",
        {"train": "u2\ti4\t2\t50\nu1\ti1\t5\t100\n", "valid": "u1\ti2\t3\t200\n", "test": "u2\ti2\t4\t150\n"},
    )
    b = load_bundle(build(config(source, tmp_path / "b", split="presplit", presplit=str(split))))
    assert b.user_ids == ["u1", "u2"] and b.item_ids == ["i1", "i2", "i4"]
    assert b.interactions("train")[["user", "item"]].values.tolist() == [[0, 0], [1, 2]]
    assert b.manifest["split"]["protocol"] == "presplit"
    assert np.array_equal(b.matrix("valid").toarray(), [[0, 1, 0], [0, 0, 0]])


def test_overwrite_replaces_atomically(source, tmp_path):
    out = build(config(source, tmp_path / "b", split="loo"))
    with pytest.raises(DataError, match="already exists"):
        build(config(source, out))
    assert json.loads((out / "manifest.json").read_text())["split"]["protocol"] == "loo"
    build(config(source, out, overwrite=True))
    assert load_bundle(out).manifest["split"]["protocol"] == "random"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "tiny"]


def test_load_bundle_rejects_non_bundle(tmp_path):
    with pytest.raises(DataError, match="manifest.json missing"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(
    "templates",
    [
        Templates(),
        Templates(
            collaborative="U{user:>7} {{likes}}",  # a format spec: formatted row by row
            finetune="[{user!r}] {history} / {user} {{x}} ",
            review="{item:x}|{user}",
            item="ITEM",  # no field at all
            user="{user}{user}",
        ),
        Templates(
            collaborative="{{}}{user}}}", finetune="{history}{history}<user_{user}>", review="{item}{user}"
        ),
    ],
)
def test_corpora_are_the_python_formatted_documents(templates):
    """The column-wise corpora hold what formatting each row in Python gives, for any template; a chunk
    of high user indices and items past the first cached names included."""
    rng = np.random.default_rng(7)
    n = 3000
    train = pd.DataFrame(
        {
            "user": 10**6 + rng.integers(0, 300, n),
            "item": rng.choice([0, 1, 5, 1023, 1024, 5000, 70000], n),
            "rating": 1.0,
            "timestamp": rng.integers(0, 40, n),
        }
    ).drop_duplicates(["user", "item"])
    ordered = train.sort_values(["user", "timestamp", "item"], kind="stable")
    users, items = ordered["user"].to_numpy(), ordered["item"].to_numpy()
    names = [placeholder("item", i) for i in items]

    def docs(mask):
        out: dict[int, list[str]] = {}
        for user, name, m in zip(users.tolist(), names, mask, strict=True):
            if m:
                out.setdefault(user, []).append(name)
        return {user: " ".join(v) for user, v in out.items()}

    full = docs(np.ones(len(users), dtype=bool))
    collaborative = collaborative_corpus(train, templates).to_pylist()
    assert collaborative == [
        {
            "kind": "collaborative",
            "user": u,
            "item": -1,
            "prompt": templates.collaborative.format(user=u),
            "main": d,
        }
        for u, d in full.items()
    ]
    n_keep = np.maximum(1, np.floor(np.bincount(users) * 0.6 + 0.5).astype(np.int64))
    shown = docs(random_rank(users, finetune_rng(3)) < n_keep[users])
    assert finetune_corpus(train, templates, finetune_rng(3), keep=0.6).to_pylist() == [
        {
            "kind": "finetune",
            "user": u,
            "item": -1,
            "prompt": templates.finetune.format(user=u, history=shown[u]),
            "main": d,
        }
        for u, d in full.items()
    ]
    reviews = ordered.assign(text=[f"text {{{i}}} ü" for i in range(len(ordered))])
    assert content_corpus(templates, [], [], reviews).to_pylist() == [
        {"kind": "review", "user": u, "item": i, "prompt": templates.review.format(user=u, item=i), "main": t}
        for u, i, t in zip(reviews["user"].tolist(), reviews["item"].tolist(), reviews["text"], strict=True)
    ]
    item_text, user_text = ["", "a film", "", "b {x}"], ["", "", "someone"]
    assert content_corpus(templates, item_text, user_text).to_pylist() == [
        {"kind": "item", "user": -1, "item": 1, "prompt": templates.item.format(item=1), "main": "a film"},
        {"kind": "item", "user": -1, "item": 3, "prompt": templates.item.format(item=3), "main": "b {x}"},
        {"kind": "user", "user": 2, "item": -1, "prompt": templates.user.format(user=2), "main": "someone"},
    ]
    empty = collaborative_corpus(train.iloc[:0], templates)
    assert len(empty) == 0 and len(content_corpus(templates, [], [])) == 0
