"""Every reader on tiny files written here, and the bad inputs each must reject with file/line/field."""

from __future__ import annotations

import gzip
import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep import DataError, load_bundle
from data_prep.build import BuildConfig, build
from data_prep.readers import (
    ColumnMap,
    read_amazon,
    read_csv_source,
    read_movielens,
    read_presplit,
    read_recbole,
)
from data_prep.text import item_text, user_text


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def recbole_dir(root: Path, inter: str | None = None) -> Path:
    d = root / "tiny"
    default = (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ti1\t5\t100\nu1\ti2\t3\t200\n\nu2\ti2\t4\t150\n"
    )
    write(d / "tiny.inter", default if inter is None else inter)
    write(
        d / "tiny.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "i1\tHeat\t1995\tAction Crime\ni2\tBabe\t\tChildren's\n",
    )
    write(d / "tiny.user", "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
          "u1\t24\tM\ttechnician\t85711\nu2\t53\tF\tother\t94043\n")  # fmt: skip
    return d


def test_recbole_reader(tmp_path):
    t = read_recbole(recbole_dir(tmp_path))
    assert t.interactions["user"].tolist() == ["u1", "u1", "u2"]
    assert t.interactions.index.tolist() == [2, 3, 5]  # physical lines; the blank line is skipped
    assert t.interactions["rating"].dtype == "float64" and t.interactions["timestamp"].dtype == "int64"
    assert item_text(t.items).tolist() == ["Heat (1995); genres: Action, Crime", "Babe; genres: Children's"]
    assert t.items["title"].tolist() == ["Heat (1995)", "Babe"]
    assert user_text(t.users).tolist() == ["24-year-old male technician", "53-year-old female"]
    assert [p.suffix for p in t.files] == [".inter", ".item", ".user"]


def test_recbole_implicit_without_rating_and_time(tmp_path):
    t = read_recbole(recbole_dir(tmp_path, "user_id:token\titem_id:token\nu1\ti1\nu2\ti1\n"))
    assert t.interactions["rating"].tolist() == [1.0, 1.0]
    assert t.interactions["timestamp"].tolist() == [2, 3]  # file order stands in for time


def test_movielens_100k_reader(tmp_path):
    d = tmp_path / "ml-100k"
    write(d / "u.data", "1\t10\t4\t881250949\n2\t10\t3\t881250950\n1\t20\t5\t881250951\n")
    flags = ["0"] * 19
    genres_10, genres_20 = list(flags), list(flags)
    genres_10[3] = genres_10[5] = "1"  # Animation, Comedy
    genres_20[0] = "1"  # unknown: left out of the text
    write(
        d / "u.item",
        "10|Café Society (1995)|01-Jan-1995||http://x|" + "|".join(genres_10) + "\n"
        "20|Mystery Film (1996)|01-Jan-1996||http://y|" + "|".join(genres_20) + "\n",
        encoding="latin-1",
    )
    write(d / "u.user", "1|24|M|technician|85711\n2|53|F|none|94043\n")
    t = read_movielens(d)
    assert t.interactions[["user", "item"]].values.tolist() == [["1", "10"], ["2", "10"], ["1", "20"]]
    assert item_text(t.items).tolist() == [
        "Café Society (1995); genres: Animation, Comedy",
        "Mystery Film (1996)",
    ]
    assert user_text(t.users).tolist() == [
        "24-year-old male technician",
        "53-year-old female with no occupation",
    ]


def test_movielens_dat_reader(tmp_path):
    d = tmp_path / "ml-1m"
    write(d / "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n")
    write(
        d / "movies.dat",
        "1193::One Flew (1975)::Drama\n661::James (1996)::Animation|Children's|Musical\n",
        "latin-1",
    )
    write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    t = read_movielens(d)
    assert t.interactions["timestamp"].tolist() == [978300760, 978302109]
    assert item_text(t.items).tolist() == [
        "One Flew (1975); genres: Drama",
        "James (1996); genres: Animation, Children's, Musical",
    ]
    assert user_text(t.users).tolist() == [
        "female K-12 student, aged under 18",
        "male self-employed, aged 56+",
    ]


def amazon_files(root: Path) -> tuple[Path, Path]:
    reviews = [
        {
            "reviewerID": "A1",
            "asin": "B1",
            "overall": 5.0,
            "unixReviewTime": 100,
            "reviewText": "Great toy.",
            "summary": "x",
        },
        {
            "reviewerID": "A1",
            "asin": "B2",
            "overall": 2.0,
            "unixReviewTime": 200,
            "reviewText": "",
            "summary": "Meh",
        },
        {"reviewerID": "A2", "asin": "B1", "overall": 4.0, "unixReviewTime": 150, "reviewText": "Nice."},
    ]
    review_path = root / "reviews_Toys_5.json.gz"
    review_path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(review_path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in reviews) + "\n")
    # 2014 metadata is a Python literal per line (single quotes), not JSON.
    meta = (
        "{'asin': 'B1', 'title': 'Robot', 'categories': [['Toys', 'Robots'], ['Toys']], 'price': 9.99, 'brand': 'Acme'}\n"
        '{"asin": "B2", "title": "Ball", "category": ["Toys", "Balls"], "description": ["Round", "and red."]}\n'
        '{"asin": "B9", "title": "Never reviewed"}\n'
    )
    return review_path, write(root / "meta_Toys.json", meta)


def test_amazon_reader(tmp_path):
    review_path, meta_path = amazon_files(tmp_path / "amazon")
    t = read_amazon(tmp_path / "amazon")  # a directory with one review and one meta file
    assert t.interactions["rating"].tolist() == [5.0, 2.0, 4.0]
    assert t.reviews["text"].tolist() == ["Great toy.", "Meh", "Nice."]  # summary when the text is empty
    assert item_text(t.items).tolist() == [
        "Robot; brand: Acme; categories: Toys, Robots; price: 9.99",
        "Ball; categories: Toys, Balls; description: Round and red.",
        "Never reviewed",
    ]
    assert t.extra_metadata_ok and t.files == [review_path, meta_path]


def test_csv_tsv_parquet_reader(tmp_path):
    frame = pd.DataFrame(
        {
            "uid": ["a", "b", "a"],
            "iid": [7, 8, 8],
            "stars": [1.0, 2.0, 3.0],
            "ts": [3, 2, 1],
            "review": ["x", "y", "z"],
        }
    )
    frame.to_csv(tmp_path / "log.csv", index=False)
    frame.to_csv(tmp_path / "log.tsv", sep="\t", index=False)
    frame.to_parquet(tmp_path / "log.parquet")
    write(tmp_path / "items.csv", 'iid,title,genre\n7,"Seven, the film",Drama\n8,Eight,\n')
    write(tmp_path / "users.tsv", "uid\tage\tcity\na\t30\tOslo\n")
    columns = ColumnMap(user="uid", item="iid", rating="stars", timestamp="ts", text="review")
    for name in ("log.csv", "log.tsv", "log.parquet"):
        t = read_csv_source(
            tmp_path / name, columns, item_meta=tmp_path / "items.csv", user_meta=tmp_path / "users.tsv"
        )
        assert t.interactions[["user", "item"]].values.tolist() == [["a", "7"], ["b", "8"], ["a", "8"]], name
        assert t.interactions["timestamp"].tolist() == [3, 2, 1]
        assert t.reviews["text"].tolist() == ["x", "y", "z"]
    assert item_text(t.items).tolist() == ["Seven, the film; genres: Drama", "Eight"]
    assert user_text(t.users).tolist() == ["30-year-old; city: Oslo"]


def test_presplit_reader(tmp_path):
    header = "user_id\titem_id\trating\ttimestamp\n"
    for name in ("train", "valid", "test"):
        write(tmp_path / f"{name}.tsv", header + "1\t2\t3\t4\n")
    parts = read_presplit(tmp_path)
    assert list(parts) == ["train", "valid", "test"]
    assert parts["test"].values.tolist() == [["1", "2", 3.0, 4]]


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error naming file, line and field.
# ----------------------------------------------------------------------------------------------
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


@pytest.mark.parametrize(
    ("inter", "line", "field", "message"),
    [
        ("user_id:token\titem:token\nu1\ti1\n", 1, "item_id", "missing column"),
        (
            INTER_HEADER + "u1\ti1\t5\t100\nu1\ti2\t5\tyesterday\n",
            3,
            "timestamp",
            "not a number: 'yesterday'",
        ),
        (INTER_HEADER + "u1\ti1\tfive\t100\n", 2, "rating", "not a number: 'five'"),
        (INTER_HEADER + "u1\ti1\t\t100\n", 2, "rating", "not a number: ''"),
        (INTER_HEADER + "\ti1\t5\t100\n", 2, "user_id", "empty id"),
        (INTER_HEADER, None, None, "no data rows"),
        ("", None, None, "file is empty"),
        (INTER_HEADER + "u1\ti1\t5\t100\t7\n", 2, None, "malformed row"),
    ],
)
def test_recbole_bad_input(tmp_path, inter, line, field, message):
    with pytest.raises(DataError, match=message) as info:
        read_recbole(recbole_dir(tmp_path, inter))
    assert (info.value.file, info.value.line, info.value.field) == (
        str(tmp_path / "tiny" / "tiny.inter"),
        line,
        field,
    )


def test_undecodable_text_names_the_line(tmp_path):
    d = recbole_dir(tmp_path)
    (d / "tiny.item").write_bytes(b"item_id:token\tmovie_title:token_seq\ni1\tok\ni2\tbad \xff byte\n")
    with pytest.raises(DataError, match="cannot decode") as info:
        read_recbole(d)
    assert (info.value.file, info.value.line) == (str(d / "tiny.item"), 3)


def test_duplicate_metadata_row(tmp_path):
    d = recbole_dir(tmp_path)
    write(d / "tiny.item", "item_id:token\tmovie_title:token_seq\ni1\ta\ni1\tb\n")
    with pytest.raises(DataError, match="duplicate metadata row") as info:
        read_recbole(d)
    assert (info.value.line, info.value.field) == (3, "item_id")


def test_movielens_short_row_and_missing_ratings(tmp_path):
    d = tmp_path / "ml"
    write(d / "u.data", "1\t10\t4\t881250949\n2\t10\t3\n")
    with pytest.raises(DataError, match="expected 4 fields") as info:
        read_movielens(d)
    assert (info.value.line, info.value.field) == (2, "timestamp")
    with pytest.raises(DataError, match="no MovieLens ratings"):
        read_movielens(tmp_path / "nothing")


def test_amazon_bad_lines(tmp_path):
    path = write(
        tmp_path / "reviews.json",
        '{"reviewerID": "A", "asin": "B", "overall": 5, "unixReviewTime": 1}\n{oops\n',
    )
    with pytest.raises(DataError, match="not valid JSON") as info:
        read_amazon(path)
    assert (info.value.file, info.value.line) == (str(path), 2)
    write(path, '{"reviewerID": "A", "asin": "B", "overall": 5}\n')
    with pytest.raises(DataError, match="missing field") as info:
        read_amazon(path)
    assert (info.value.line, info.value.field) == (1, "unixReviewTime")
    write(path, '{"reviewerID": "A", "asin": "B", "overall": "great", "unixReviewTime": 1}\n')
    with pytest.raises(DataError, match="not a number") as info:
        read_amazon(path)
    assert (info.value.line, info.value.field) == (1, "overall")


def test_csv_bad_mapping_and_type(tmp_path):
    path = write(tmp_path / "log.csv", "user,item\na,b\n")
    with pytest.raises(DataError, match="missing column; the file has \\['user', 'item'\\]") as info:
        read_csv_source(path, ColumnMap(user="user", item="item_id"))
    assert (info.value.line, info.value.field) == (1, "item_id")
    with pytest.raises(DataError, match="unknown table type '.json'"):
        read_csv_source(write(tmp_path / "log.json", "{}"), ColumnMap())


# ---------------------------------------------------------------------- data: bad input and failures
LOG = "user_id,item_id,timestamp\n" + "".join(
    f"u{u},i{(u + k) % 7},{10 * k}\n" for u in range(6) for k in range(5)
)


@pytest.fixture
def csv_source(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "log.csv"
    path.write_text(LOG)
    return path


def csv_config(source: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(format="csv", input=str(source), out=str(out), **{"time_col": "timestamp", **kw})


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ------------------------------------------------------------------------------------------------ build output
@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_output_that_is_inside_or_contains_the_input_is_refused(tmp_path, where):
    source = tmp_path / "data" / "src"
    source.mkdir(parents=True)
    (source / "src.inter").write_text("user_id:token\titem_id:token\nu1\ti1\n")
    out = {"is": source, "inside": source / "bundle", "contains": tmp_path / "data"}[where]
    relation = "lies inside" if where == "inside" else where
    with pytest.raises(DataError, match=f"the output {relation} the --input"):
        build(BuildConfig(format="recbole", input=str(source), out=str(out), overwrite=True))
    assert sorted(p.name for p in source.iterdir()) == ["src.inter"]


def test_overwrite_of_an_existing_file_or_foreign_directory_is_refused(csv_source, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(DataError, match="is an existing file"):
        build(csv_config(csv_source, target, overwrite=True))
    assert target.read_text() == "keep me" and leftovers(tmp_path, "notes.txt") == []
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me too")
    with pytest.raises(DataError, match="holds no manifest.json"):
        build(csv_config(csv_source, foreign, overwrite=True))
    assert (foreign / "thesis.tex").read_text() == "keep me too"


@pytest.mark.parametrize("out", ["parent-is-a-file", "/sys/llmrec-bundle"])
def test_unwritable_output_is_a_data_error(csv_source, tmp_path, out):
    if out == "parent-is-a-file":
        (tmp_path / "afile").write_text("")
        out = str(tmp_path / "afile" / "bundle")
    with pytest.raises(DataError, match="cannot write the output directory"):
        build(csv_config(csv_source, Path(out)))


def test_stale_temporary_directories_of_a_killed_build_are_removed(csv_source, tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".bundle.tmp-{dead}-abc").mkdir()
    (tmp_path / f".bundle.old-{dead}").mkdir()
    (tmp_path / f".bundle.tmp-{os.getpid()}-live").mkdir()  # a live writer's (this process): kept
    build(csv_config(csv_source, tmp_path / "bundle"))
    assert leftovers(tmp_path, "bundle") == [f".bundle.tmp-{os.getpid()}-live"]


def test_bundle_gets_the_users_umask(csv_source, tmp_path):
    old = os.umask(0o022)
    try:
        out = build(csv_config(csv_source, tmp_path / "bundle"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


# ------------------------------------------------------------------------------------------------ sources
def test_interactions_only_source_builds_a_loadable_bundle_with_empty_content(csv_source, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        out = build(csv_config(csv_source, tmp_path / "bundle"))
    assert "content corpus is empty" in caplog.text
    bundle = load_bundle(out)
    assert len(bundle.corpus("content")) == 0 and len(bundle.corpus("collaborative")) == 6


def test_bundle_with_a_zero_shard_corpus_from_older_versions_loads(csv_source, tmp_path):
    out = build(csv_config(csv_source, tmp_path / "bundle"))
    content = out / "corpora" / "content"
    for arrow in content.glob("*.arrow"):
        arrow.unlink()
    state = json.loads((content / "state.json").read_text())
    (content / "state.json").write_text(json.dumps({**state, "_data_files": []}))
    assert len(load_bundle(out, verify=False).corpus("content")) == 0


@pytest.mark.parametrize(
    ("fmt", "name", "body", "column"),
    [
        ("csv", "log.csv", "user_id,item_id,user_id\nu1,i1,u2\n", "user_id"),
        ("recbole", "x.inter", "user_id:token\titem_id:token\titem_id:float\nu1\ti1\t3\n", "item_id"),
    ],
)
def test_duplicate_header_column_is_named(tmp_path, fmt, name, body, column):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / name).write_text(body)
    source = tmp_path / "x" / name if fmt == "csv" else tmp_path / "x"
    with pytest.raises(DataError, match="column named twice") as info:
        build(BuildConfig(format=fmt, input=str(source), out=str(tmp_path / "b")))
    assert (info.value.line, info.value.field) == (1, column)


def test_deeply_nested_amazon_line_is_refused_with_its_line(tmp_path):
    good = json.dumps({"reviewerID": "a", "asin": "b", "overall": 5, "unixReviewTime": 1})
    for bracket in "[(":  # JSON and the Python-literal fallback of the 2014 metadata files
        path = tmp_path / "reviews.json"
        path.write_text(good + "\n" + bracket * 200_000 + "\n")
        with pytest.raises(DataError, match="nested more than 100 levels") as info:
            read_amazon(path)
        assert info.value.line == 2


def test_non_positive_ratings_are_reported_and_a_threshold_drops_them(tmp_path, caplog):
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "log.csv"
    rows = [f"u{u},i{i},{-1 if i == 0 else 4},{i}" for u in range(4) for i in range(5)]
    path.write_text("user_id,item_id,rating,timestamp\n" + "\n".join(rows) + "\n")
    config = csv_config(path, tmp_path / "all", rating_col="rating")
    with caplog.at_level(logging.WARNING):
        kept = load_bundle(build(config))
    assert "4 interactions have a rating <= 0 and still count as positive" in caplog.text
    assert kept.n_items == 5
    config = csv_config(path, tmp_path / "liked", rating_col="rating", rating_threshold=1)
    assert load_bundle(build(config)).n_items == 4


def test_empty_held_out_splits_are_reported_with_the_counts(tmp_path, caplog):
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "log.csv"
    path.write_text("user_id,item_id\n" + "".join(f"u{u},i{u + k}\n" for u in range(5) for k in range(2)))
    with caplog.at_level(logging.WARNING):
        bundle = load_bundle(build(csv_config(path, tmp_path / "b", time_col=None)))
    assert bundle.interactions("valid").empty
    assert "the valid and test split(s) came out empty: users have 2 to 2 interactions" in caplog.text


# ------------------------------------------------------------------------------------------------ presplit
def write_split(directory: Path, train: str, valid: str, test: str) -> Path:
    directory.mkdir()
    for name, body in (("train", train), ("valid", valid), ("test", test)):
        (directory / f"{name}.tsv").write_text("user_id\titem_id\n" + body)
    return directory


def test_presplit_overlap_is_refused_with_the_first_row(csv_source, tmp_path):
    split = write_split(tmp_path / "split", "u1\ti1\nu1\ti2\nu2\ti3\n", "u1\ti4\n", "u2\ti5\nu1\ti2\n")
    config = csv_config(csv_source, tmp_path / "b", split="presplit", presplit=str(split), time_col=None)
    with pytest.raises(
        DataError, match=r"item 'i2' are also in train.tsv \(1 test rows overlap train\)"
    ) as info:
        build(config)
    assert (info.value.file, info.value.line) == (str(split / "test.tsv"), 3)
    assert leftovers(tmp_path, "b") == [] and not (tmp_path / "b").exists()


def test_presplit_duplicates_are_collapsed_and_counted(csv_source, tmp_path):
    split = write_split(
        tmp_path / "split", "u1\ti1\nu1\ti1\nu2\ti3\n", "u1\ti4\n", "u2\ti5\nu2\ti5\nu2\ti5\n"
    )
    config = csv_config(csv_source, tmp_path / "b", split="presplit", presplit=str(split), time_col=None)
    bundle = load_bundle(build(config))
    assert len(bundle.interactions("train")) == 2 and len(bundle.interactions("test")) == 1
    filters = bundle.manifest["filters"]
    assert filters["duplicates_removed"] == 3
    assert filters["duplicates_removed_per_split"] == {"train": 1, "valid": 0, "test": 2}


# ------------------------------------------------------------------------------------------------ loading
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_last_line(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def _edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {
    "truncated arrow corpus": (
        lambda b: _truncate(next((b / "corpora" / "collaborative").glob("*.arrow"))),
        "collaborative",
    ),
    "items.tsv shorter": (lambda b: _drop_last_line(b / "items.tsv"), "items.tsv"),
    "manifest not JSON": (lambda b: (b / "manifest.json").write_text("{not json"), "manifest.json"),
    "edited count": (lambda b: _edit_manifest(b, lambda m: m["counts"].update(train=1)), "train.tsv"),
    "edited hash": (
        lambda b: _edit_manifest(b, lambda m: m["files"]["users.tsv"].update(sha256="0" * 64)),
        "users.tsv",
    ),
}


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_bundle_is_a_data_error_naming_the_file(csv_source, tmp_path, damage, verify):
    out = build(csv_config(csv_source, tmp_path / "bundle"))
    harm, name = DAMAGE[damage]
    harm(out)
    if damage == "edited hash" and not verify:
        return  # hashes are what verify=False skips
    with pytest.raises(DataError, match="rebuild|corrupted|truncated") as info:
        bundle = load_bundle(out, verify=verify)
        bundle.interactions("train")
        bundle.corpus("collaborative")
    assert name in str(info.value)


# ------------------------------------------------------------------------------------------------ id types
ID_CLASSES = {  # value in the item column -> (file formats that can hold it, the error)
    "none": (None, ("parquet", "json"), "missing id"),
    "nan": (float("nan"), ("parquet", "json"), "missing id"),
    "list": (["a", "b"], ("parquet", "json"), "not an id: a"),
    "mapping": ({"a": 1}, ("json",), "not an id: a dict"),
    "fraction": (2.5, ("parquet", "json"), "2.5 is not a whole-number id"),
    "huge float": (2.0**60, ("parquet", "json"), "is not a whole-number id"),
    "boolean": (True, ("parquet", "json"), "a boolean"),
    "blank": ("  ", ("csv", "parquet", "json"), "empty id"),
}


def id_source(tmp_path: Path, fmt: str, items: list) -> Path:
    """Interactions of two users whose item column holds ``items``, as CSV, Parquet or JSON lines."""
    users, times = ["u1", "u1", "u2", "u2"], [1, 2, 3, 4]
    if fmt == "json":
        path = tmp_path / "reviews.json"
        rows = zip(users, items, times, strict=True)
        path.write_text(
            "".join(
                json.dumps({"reviewerID": u, "asin": i, "overall": 5, "unixReviewTime": t}) + "\n"
                for u, i, t in rows
            )
        )
        return path
    frame = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": times})
    if fmt == "csv":
        frame.to_csv(tmp_path / "log.csv", index=False)
        return tmp_path / "log.csv"
    frame.to_parquet(tmp_path / "log.parquet")
    return tmp_path / "log.parquet"


def read_ids(path: Path) -> list[str]:
    if path.suffix == ".json":
        return read_amazon(path).interactions["item"].tolist()
    return read_csv_source(path, ColumnMap(timestamp="timestamp")).interactions["item"].tolist()


@pytest.mark.parametrize(
    ("case", "fmt"), [(case, fmt) for case, (_, fmts, _) in ID_CLASSES.items() for fmt in fmts]
)
def test_ids_of_unusual_types_are_errors_naming_file_row_and_field(tmp_path, case, fmt):
    value, _, error = ID_CLASSES[case]
    if fmt == "parquet" and not isinstance(value, (str, type(None))):  # a column of one type
        items = [value] * 4 if isinstance(value, (list, bool)) else [1.0, 3.0, value, 4.0]
        if isinstance(value, float) and np.isnan(value):
            items = [1.0, 3.0, value, 4.0]
    else:
        items = ["i1", "i2", value, "i3"] if fmt != "parquet" else ["i1", "i2", value, "i3"]
    path = id_source(tmp_path, fmt, items)
    line = 1 if fmt == "parquet" and isinstance(value, (list, bool)) else 3 + (fmt == "csv")
    field = "asin" if fmt == "json" else "item_id"
    with pytest.raises(DataError, match=error) as caught:
        read_ids(path)
    assert (caught.value.file, caught.value.line, caught.value.field) == (str(path), line, field)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_numeric_ids_are_one_id_whatever_the_format_typed_them_as(tmp_path, fmt):
    items = {"csv": ["12", "7", "12", "١٢"], "parquet": [12.0, 7.0, 12.0, 3.0], "json": [12, 7, 12.0, "١٢"]}[
        fmt
    ]
    ids = read_ids(id_source(tmp_path, fmt, items))
    assert ids[:3] == ["12", "7", "12"]  # 12, 12.0 and "12" are the same id
    if fmt != "parquet":
        assert ids[3] == "١٢"  # Unicode digits stay as written: not the id "12"


@pytest.mark.parametrize(
    ("times", "fmt", "error"),
    [
        ([1, 2, float("nan"), 4], "parquet", "not a number: nan"),
        (["1", "2", "2020-01-01", "4"], "csv", "not a number: '2020-01-01'"),
        (["1", "2", "inf", "4"], "csv", "not a number: 'inf'"),
        (pd.to_datetime(["2020-01-01", "2020-01-02", None, "2020-01-04"]), "parquet", "not a number: NaT"),
    ],
)
def test_odd_timestamps_are_errors_naming_the_row(tmp_path, times, fmt, error):
    frame = pd.DataFrame(
        {"user_id": ["u1", "u1", "u2", "u2"], "item_id": ["a", "b", "a", "c"], "timestamp": times}
    )
    path = tmp_path / f"log.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    with pytest.raises(DataError, match=error) as caught:
        read_csv_source(path, ColumnMap(timestamp="timestamp"))
    assert (caught.value.line, caught.value.field) == (3 + (fmt == "csv"), "timestamp")
