"""Filtering, id maps and every split protocol's invariants."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.errors import DataError
from data_prep.process import align_metadata, apply_threshold, drop_duplicates, encode, k_core, sorted_ids
from data_prep.splits import leave_one_out, random_split, temporal_split, user_histories


def frame(rows: list[tuple]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    df.index = np.arange(len(df)) + 2
    return df


def test_threshold_dedupe_keep_latest():
    df = frame([(0, 0, 1.0, 9), (0, 0, 4.0, 5), (1, 0, 3.0, 1), (1, 0, 5.0, 1), (1, 1, 2.0, 3)])
    deduped = drop_duplicates(df)
    # (0, 0): the later timestamp wins even though it comes first; (1, 0): same time, later line wins
    assert deduped[["user", "item", "rating"]].values.tolist() == [[0, 0, 1.0], [1, 0, 5.0], [1, 1, 2.0]]
    assert deduped.index.tolist() == [2, 5, 6]  # source lines kept, file order kept
    assert drop_duplicates(deduped) is deduped
    assert apply_threshold(deduped, 3.0)["rating"].tolist() == [5.0]
    assert apply_threshold(deduped, None) is deduped


def test_k_core_is_iterative():
    # d has one interaction; once d goes, z has one (c's), then c is left with one (x): a cascade
    # that a single filtering pass would miss.
    rows = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"), ("c", "x"), ("c", "z"), ("d", "z")]
    df = frame([(u, i, 1.0, t) for t, (u, i) in enumerate(rows)])
    assert sorted(map(tuple, k_core(df, 2)[["user", "item"]].values)) == rows[:4]
    assert k_core(df, 3).empty
    assert k_core(df, 0) is df


def test_id_maps_round_trip():
    assert sorted_ids(pd.Series(["10", "2", "1", "2"])) == ["1", "2", "10"]
    assert sorted_ids(pd.Series(["b", "10", "a"])) == ["10", "a", "b"]
    ids = sorted_ids(pd.Series(["u9", "u1", "u5"]))
    codes = encode(pd.Series(["u5", "u9", "zz"]), ids)
    assert codes.tolist() == [1, 2, -1]
    assert [ids[c] for c in codes[:2]] == ["u5", "u9"]


@pytest.mark.parametrize(
    "ids",
    [
        ["3", "10", "2", "007", "7", "07", "0", "00"],
        ["b", "a", "B", "ä", "😀", "z", "10", "9", "", "a b", "a\t", "e\u0301", "é", "\x7f", "\uffff", "𐀀"],
        ["١٢", "3", "12"],  # non-ASCII digits: still numbers, sorted by Python
        ["18446744073709551616", "5", "18446744073709551615"],  # past 64 bits
        [],
        [str(i) for i in np.random.default_rng(0).integers(0, 10**12, 3000)],
        [f"u{i}" for i in np.random.default_rng(1).integers(0, 10**6, 3000)],
    ],
)
def test_sorted_ids_is_python_sorting(ids):
    """Arrow's sort gives the order the definition gives in Python: by number when every id is one (ties
    by the string), else by code point."""
    unique = list(dict.fromkeys(ids))
    key = (lambda v: (int(v), v)) if all(v.isdigit() for v in unique) else None
    assert sorted_ids(np.array(ids + ids[:5], dtype=object)) == sorted(unique, key=key)


def test_align_metadata(caplog):
    meta = pd.DataFrame({"item": ["a", "b", "c"], "title": ["A", "", "C"]}, index=[2, 3, 4])
    text = pd.Series(["A text", "B text", "C text"], index=meta.index)
    # c was in the raw log but filtered away; d has no metadata row
    with caplog.at_level(logging.WARNING):
        titles, texts = align_metadata(
            meta, "item", ["a", "b", "d"], {"a", "b", "c", "d"}, Path("m.tsv"), text
        )
    assert titles == ["A", "b", "d"] and texts == ["A text", "B text", ""]
    assert "1 of 3 items have no metadata" in caplog.text
    with pytest.raises(DataError, match="metadata for item 'c', which has no interactions") as info:
        align_metadata(meta, "item", ["a", "b"], {"a", "b"}, Path("m.tsv"), text)
    assert (info.value.file, info.value.line, info.value.field) == ("m.tsv", 4, "item")
    titles, _ = align_metadata(meta, "item", ["a"], {"a"}, Path("m.tsv"), text, extra_ok=True)
    assert titles == ["A"]


# ----------------------------------------------------------------------------------------------
# Split invariants on random logs
# ----------------------------------------------------------------------------------------------
logs = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 30), st.integers(0, 50)), min_size=1, max_size=120
).map(
    lambda rows: pd.DataFrame(rows, columns=["user", "item", "timestamp"]).drop_duplicates(["user", "item"])
)


def prepared(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    users = np.unique(df["user"], return_inverse=True)[1]
    out = df.assign(user=users, rating=1.0).reset_index(drop=True)
    return out, int(users.max()) + 1


def check_partition(df: pd.DataFrame, splits: dict[str, pd.DataFrame]) -> None:
    key = ["user", "item"]
    parts = pd.concat([splits[s][key] for s in ("train", "valid", "test")])
    assert sorted(map(tuple, parts.values)) == sorted(map(tuple, df[key].values))  # a partition
    train_users = set(splits["train"]["user"])
    assert set(splits["valid"]["user"]) <= train_users and set(splits["test"]["user"]) <= train_users


@settings(max_examples=40, deadline=None)
@given(logs, st.integers(0, 5))
def test_random_split_invariants(raw, seed):
    df, n_users = prepared(raw)
    splits = random_split(df, n_users, (0.6, 0.2, 0.2), seed)
    check_partition(df, splits)
    counts = np.bincount(df["user"], minlength=n_users)
    for name, ratio in (("valid", 0.2), ("test", 0.2)):
        got = np.bincount(splits[name]["user"], minlength=n_users)
        assert (got <= np.floor(counts * ratio + 0.5)).all()
        assert (got[counts >= 5] == np.floor(counts[counts >= 5] * ratio + 0.5)).all()
    again = random_split(df, n_users, (0.6, 0.2, 0.2), seed)
    assert all(again[s].equals(splits[s]) for s in splits)


def test_random_split_seed_matters():
    df, n_users = prepared(pd.DataFrame({"user": [0] * 50, "item": range(50), "timestamp": range(50)}))
    a = random_split(df, n_users, (0.8, 0.1, 0.1), 0)["test"]["item"].tolist()
    b = random_split(df, n_users, (0.8, 0.1, 0.1), 1)["test"]["item"].tolist()
    assert len(a) == 5 and a != b


@settings(max_examples=40, deadline=None)
@given(logs)
def test_temporal_split_invariants(raw):
    df, n_users = prepared(raw)
    splits = temporal_split(df, n_users, (0.5, 0.25, 0.25))
    check_partition(df, splits)
    for user in range(n_users):
        times = [splits[s].loc[splits[s]["user"] == user, "timestamp"] for s in ("train", "valid", "test")]
        for earlier, later in zip(times, times[1:], strict=False):
            if len(earlier) and len(later):
                assert earlier.max() <= later.min()


@settings(max_examples=40, deadline=None)
@given(logs)
def test_leave_one_out_invariants(raw):
    df, n_users = prepared(raw)
    splits = leave_one_out(df, n_users)
    check_partition(df, splits)
    counts = np.bincount(df["user"], minlength=n_users)
    assert (np.bincount(splits["test"]["user"], minlength=n_users) == (counts >= 2)).all()
    assert (np.bincount(splits["valid"]["user"], minlength=n_users) == (counts >= 3)).all()
    latest = df.sort_values("timestamp", kind="stable").groupby("user")["timestamp"].max()
    test = splits["test"].set_index("user")["timestamp"]
    assert (test == latest.loc[test.index]).all()


def test_bad_ratios():
    df, n_users = prepared(pd.DataFrame({"user": [0, 0], "item": [1, 2], "timestamp": [1, 2]}))
    with pytest.raises(DataError, match="three non-negative numbers"):
        random_split(df, n_users, (0.8, 0.2), 0)


def test_user_histories_are_time_ordered():
    frame = pd.DataFrame({"user": [1, 0, 1, 1], "item": [5, 2, 3, 4], "timestamp": [30, 1, 10, 20]})
    assert user_histories(frame, n_users=3) == [[2], [3, 4, 5], []]
