"""Every reader on tiny files written here, and the bad inputs each must reject with file/line/field."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from data_prep.errors import DataError
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
