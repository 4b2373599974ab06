"""Cold-start splits: exactly the chosen items/users are held out, and none of them reaches training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep import load_bundle
from data_prep.build import BuildConfig, build
from data_prep.cold import cold_ids, cold_item_split, cold_user_split
from data_prep.errors import DataError

N_USERS, N_ITEMS = 30, 40


def log(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [
        (u, int(i), 1.0, int(t))
        for u in range(N_USERS)
        for t, i in enumerate(rng.choice(N_ITEMS, 12, replace=False))
    ]
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


def pairs(df: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(df["user"], df["item"], strict=True))


def test_cold_items_hold_out_exactly_the_chosen_items():
    df = log()
    splits, cold = cold_item_split(df, N_USERS, N_ITEMS, cold_ratio=0.2, seed=3)
    chosen = set(cold["valid"]) | set(cold["test"])
    assert len(chosen) == 8 and not set(cold["valid"]) & set(cold["test"])
    assert not set(splits["train"]["item"]) & chosen  # no cold item is trained on
    # every interaction with a valid-cold item is in valid, every one with a test-cold item in test
    for name in ("valid", "test"):
        expected = pairs(df[df["item"].isin(cold[name])])
        assert pairs(splits[name][splits[name]["item"].isin(chosen)]) == expected
    # a partition of the log, and the warm items split as before
    assert sorted(pairs(pd.concat(splits.values()))) == sorted(pairs(df))
    assert set(splits["train"]["item"]) == set(range(N_ITEMS)) - chosen
    again, cold_again = cold_item_split(df, N_USERS, N_ITEMS, cold_ratio=0.2, seed=3)
    assert cold_again == cold and all(again[s].equals(splits[s]) for s in splits)
    assert cold_item_split(df, N_USERS, N_ITEMS, cold_ratio=0.2, seed=4)[1] != cold


def test_cold_users_history_first_targets_later():
    df = log()
    splits, cold = cold_user_split(df, N_USERS, cold_ratio=0.2, seed=1)
    assert len(cold["valid"]) + len(cold["test"]) == 6
    for name in ("valid", "test"):
        other = "test" if name == "valid" else "valid"
        for user in cold[name]:
            history = splits["train"][splits["train"]["user"] == user]
            targets = splits[name][splits[name]["user"] == user]
            assert len(history) == 10 and len(targets) == 2  # 80% of 12, rounded, by time
            assert history["timestamp"].max() < targets["timestamp"].min()
            assert not (splits[other]["user"] == user).any()
    assert sorted(pairs(pd.concat(splits.values()))) == sorted(pairs(df))


@pytest.mark.parametrize(
    "ratio, match", [(0.0, "strictly between"), (1.0, "strictly between"), (0.02, "at least 2")]
)
def test_bad_cold_ratio(ratio, match):
    with pytest.raises(DataError, match=match) as info:
        cold_item_split(log(), N_USERS, N_ITEMS, cold_ratio=ratio)
    assert info.value.field == "cold_ratio"


def write_source(directory: Path) -> Path:
    directory.mkdir()
    df = log()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"u{u}\ti{i}\t{r}\t{t}" for u, i, r, t in df.itertuples(index=False)]
    (directory / "toy.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\tgenre:token_seq"]
    items += [f"i{i}\tMovie {i}\tDrama" for i in range(N_ITEMS)]
    (directory / "toy.item").write_text("\n".join(items) + "\n")
    return directory


def test_cold_items_bundle(tmp_path):
    source = write_source(tmp_path / "toy")
    config = BuildConfig(
        input=str(source), out=str(tmp_path / "b"), split="cold-items", cold_ratio=0.2, seed=5
    )
    bundle = load_bundle(build(config))
    split = bundle.manifest["split"]
    assert split["protocol"] == "cold-items" and split["seed"] == 5 and split["cold_ratio"] == 0.2
    cold = cold_ids(bundle.manifest, "items")
    assert len(cold) == 8
    assert split["cold_items"]["test"]["raw_id"] == [
        bundle.item_ids[i] for i in split["cold_items"]["test"]["index"]
    ]
    assert not set(bundle.interactions("train")["item"]) & set(cold.tolist())
    # no document of the corpora mentions a cold item
    placeholders = {f"<item_{i}>" for i in cold}
    for name in ("collaborative", "content", "finetune"):
        for row in bundle.corpus(name):
            words = set((row["prompt"] + " " + row["main"]).replace(",", " ").split())
            assert not words & placeholders, (name, row)
    assert cold_ids(bundle.manifest, "users").size == 0


def test_cold_users_bundle_keeps_them_out_of_corpora(tmp_path):
    source = write_source(tmp_path / "toy")
    config = BuildConfig(input=str(source), out=str(tmp_path / "b"), split="cold-users", cold_ratio=0.2)
    bundle = load_bundle(build(config))
    cold = set(cold_ids(bundle.manifest, "users").tolist())
    assert len(cold) == 6 and cold <= set(bundle.interactions("train")["user"])  # their history
    for name in ("collaborative", "finetune"):
        assert not set(bundle.corpus(name)["user"]) & cold


def test_finetuning_leaves_cold_users_out(tmp_path):
    from llmrec.backbone import BackboneConfig
    from llmrec.model import ModelConfig
    from llmrec.pipeline import finetune_dataset, model_for

    source = write_source(tmp_path / "toy")
    config = BuildConfig(input=str(source), out=str(tmp_path / "b"), split="cold-users", cold_ratio=0.2)
    bundle = load_bundle(build(config))
    model = model_for(bundle, ModelConfig(lora_r=4), BackboneConfig("tiny-llama"))
    users = set(finetune_dataset(bundle, model, seed=0, with_content=False).users)
    assert users == set(range(N_USERS)) - set(cold_ids(bundle.manifest, "users").tolist())
