"""The out-of-core engine (DuckDB) against the in-memory one: byte-identical bundles on every split
protocol and source format, the same one-line errors, and the chunked corpus writer."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from datasets import load_from_disk

from data_prep import DataError, load_bundle
from data_prep import chunks as chunked
from data_prep.build import BuildConfig, build, choose_engine
from data_prep.bundle import CorpusWriter
from data_prep.corpora import FEATURES

pytest.importorskip("duckdb")

N_USERS, N_ITEMS = 40, 25


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of a few hundred bytes, so that a fixture file is read in many pieces."""
    monkeypatch.setattr(chunked, "BLOCK_BYTES", 300)


def log_rows(seed: int = 0) -> pd.DataFrame:
    """A skewed log with repeated pairs, equal timestamps and a few ratings at or below zero."""
    rng = np.random.default_rng(seed)
    n = 700
    users = rng.zipf(1.6, size=n) % N_USERS
    items = rng.zipf(1.4, size=n) % N_ITEMS
    return pd.DataFrame(
        {
            "user": [f"u{u}" for u in users],
            "item": [f"i{i}" for i in items],
            "rating": rng.integers(0, 6, size=n),
            "timestamp": rng.integers(0, 60, size=n),  # many ties
        }
    )


@pytest.fixture(scope="module")
def recbole(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("log") / "log"
    d.mkdir()
    df = log_rows()
    lines = [f"{r.user}\t{r.item}\t{r.rating}\t{r.timestamp}" for r in df.itertuples()]
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    (d / "log.inter").write_text(header + "\n".join(lines) + "\n")
    items = "".join(f"i{i}\tFilm {i}\tDrama{' Comedy' * (i % 2)}\n" for i in range(N_ITEMS) if i != 3)
    (d / "log.item").write_text("item_id:token\ttitle:token_seq\tclass:token_seq\n" + items)
    present = sorted({int(u[1:]) for u in df.user})
    users = "".join(f"u{u}\t{20 + u}\t{'MF'[u % 2]}\twriter\n" for u in present[::2])
    (d / "log.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\n" + users)
    return d


def files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def assert_same_bundle(tmp_path: Path, **kw) -> Path:
    """Build with both engines (DuckDB in chunks of 23 rows) and compare every file byte for byte."""
    memory = build(BuildConfig(out=str(tmp_path / "memory"), engine="memory", **kw))
    duck = build(BuildConfig(out=str(tmp_path / "duckdb"), engine="duckdb", chunk_rows=23, **kw))
    a, b = files(memory), files(duck)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name
    return memory


@pytest.mark.parametrize(
    "split, extra",
    [
        ("random", {}),
        ("temporal", {"ratios": [0.6, 0.2, 0.2]}),
        ("loo", {"rating_threshold": 1.0, "k_core": 3}),
        ("cold-items", {"cold_ratio": 0.2, "seed": 3}),
        ("cold-users", {"cold_ratio": 0.2, "seed": 1}),
    ],
)
def test_engines_write_identical_bundles(recbole, tmp_path, split, extra):
    out = assert_same_bundle(tmp_path, input=str(recbole), format="recbole", split=split, **extra)
    bundle = load_bundle(out)  # and it is a valid bundle
    assert bundle.manifest["counts"]["train"] > 0 and len(bundle.corpus("finetune")) > 0
    assert bundle.manifest["filters"]["duplicates_removed"] > 0  # the fixture exercises duplicate collapse


def test_same_bundle_from_every_format(tmp_path):
    df = log_rows(seed=1)
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "ratings.dat").write_text(
        "".join(f"{r.user[1:]}::{r.item[1:]}::{r.rating}::{r.timestamp}\n" for r in df.itertuples())
    )
    (ml / "movies.dat").write_text(
        "".join(f"{i}::Film {i} (1990)::Drama|Comedy\n" for i in sorted({int(x[1:]) for x in df.item}))
    )
    assert_same_bundle(tmp_path / "ml-out", input=str(ml), format="movielens", split="random")

    texts = ["Great.", "", "  ", 'Says "hi",\nthen leaves.']  # blank ones do not count as reviews
    df["text"] = [texts[i % 4] for i in range(len(df))]
    df.to_csv(tmp_path / "log.csv", index=False)
    csv_kw = {"format": "csv", "user_col": "user", "item_col": "item", "rating_col": "rating"}
    csv_kw |= {"time_col": "timestamp", "text_col": "text", "split": "loo"}
    out = assert_same_bundle(tmp_path / "csv-out", input=str(tmp_path / "log.csv"), **csv_kw)
    assert load_bundle(out).corpus("content")[0]["kind"] == "review"
    df.to_parquet(tmp_path / "log.parquet", row_group_size=50)
    assert_same_bundle(
        tmp_path / "pq-out", input=str(tmp_path / "log.parquet"), **{**csv_kw, "time_col": None}
    )

    amazon = tmp_path / "amazon"
    amazon.mkdir()
    with gzip.open(amazon / "reviews_Toys.json.gz", "wt", encoding="utf-8") as fh:
        for r in df.itertuples():
            record = {
                "reviewerID": r.user,
                "asin": r.item,
                "overall": float(r.rating),
                "unixReviewTime": int(r.timestamp),
            }
            fh.write(json.dumps({**record, "reviewText": r.text.replace("\n", " ")}) + "\n")
    (amazon / "meta_Toys.json").write_text(
        "".join(json.dumps({"asin": f"i{i}", "title": f"Toy {i}"}) + "\n" for i in range(60))
    )
    assert_same_bundle(tmp_path / "amazon-out", input=str(amazon), format="amazon", split="random", seed=2)


@pytest.mark.parametrize(
    "line, bad, message",
    [
        (150, "u1\ti1\tfive\t3", "not a number: 'five'"),
        (170, "u1\t\t4\t3", "empty id"),
        (190, "u1\ti1\t4", "not a number"),
    ],
)
def test_same_error_on_malformed_rows(recbole, tmp_path, line, bad, message):
    d = tmp_path / "bad"
    d.mkdir()
    lines = (recbole / "log.inter").read_text().splitlines()
    lines[line - 1] = bad
    (d / "bad.inter").write_text("\n".join(lines) + "\n")
    errors = []
    for engine in ("memory", "duckdb"):
        with pytest.raises(DataError, match=message) as err:
            build(BuildConfig(input=str(d), out=str(tmp_path / engine), engine=engine))
        errors.append(str(err.value))
        assert f"line {line}," in errors[-1]  # the error names the line, far past the first block
    assert errors[0] == errors[1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("7::12::five::3", "field 'rating': not a number: 'five'"),
        ("7::::4::3", "field 'item_id': empty id"),
        ("7::12::4", "field 'timestamp': expected 4 fields"),
        ("7::12::4::0x10", "field 'timestamp': not a number: '0x10'"),
    ],
)
def test_same_error_on_malformed_movielens_rows(tmp_path, bad, message):
    """MovieLens '::' lines, which the out-of-core build splits with Arrow: the same one-line errors."""
    d = tmp_path / "ml"
    d.mkdir()
    lines = [f"{u}::{i}::4::{100 + u}" for u in range(40) for i in range(5)]
    lines[150] = bad
    (d / "ratings.dat").write_text("\n".join(lines) + "\n")
    errors = []
    for engine in ("memory", "duckdb"):
        with pytest.raises(DataError) as err:
            build(BuildConfig(input=str(d), format="movielens", out=str(tmp_path / engine), engine=engine))
        errors.append(str(err.value))
    assert errors[0] == errors[1] == f"{d / 'ratings.dat'}, line 151, {message}"


def test_duckdb_threads(recbole, tmp_path):
    """One DuckDB thread or DuckDB's default: the same bundle; a negative count is refused."""
    kw = {"input": str(recbole), "format": "recbole", "engine": "duckdb", "chunk_rows": 31}
    one = build(BuildConfig(out=str(tmp_path / "one"), threads=1, **kw))
    default = build(BuildConfig(out=str(tmp_path / "default"), **kw))
    assert files(one) == files(default)
    with pytest.raises(DataError, match=r"^field 'threads': must be 0 \(DuckDB's default\) or more, got -1$"):
        build(BuildConfig(out=str(tmp_path / "bad"), threads=-1, **kw))


def test_auto_engine_by_size(recbole, tmp_path):
    config = BuildConfig(input=str(recbole), out=str(tmp_path / "b"))
    assert choose_engine(config) == "memory"
    config.auto_bytes = 100
    assert choose_engine(config) == "duckdb"
    config.split = "presplit"  # a fixed split is read in memory
    assert choose_engine(config) == "memory"


def test_corpus_writer_independent_of_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr("data_prep.bundle.CORPUS_BATCH_ROWS", 4)
    rows = {"kind": ["item"] * 10, "user": list(range(10)), "item": [-1] * 10}
    table = pa.table({**rows, "prompt": [f"p{i}" for i in range(10)], "main": ["m" * i for i in range(10)]})
    outputs = []
    for name, cuts in (("one", [10]), ("many", [3, 0, 1, 5, 1])):
        writer, start = CorpusWriter(tmp_path / name), 0
        for size in cuts:
            writer.write(table.slice(start, size))
            start += size
        assert writer.close() == 10
        outputs.append(files(tmp_path / name))
        assert load_from_disk(str(tmp_path / name))["prompt"] == table.column("prompt").to_pylist()
    assert outputs[0] == outputs[1]
    empty = CorpusWriter(tmp_path / "empty")
    empty.close()
    assert len(load_from_disk(str(tmp_path / "empty"))) == 0
    assert load_from_disk(str(tmp_path / "empty")).features == FEATURES


BLOCKS = {
    "plain": "1\t10\t5\t100\n2\t11\t4\t101\n3\t12\t3\t102\n",
    "no final newline": "1\t10\t5\t100\n2\t11\t4\t101",
    "crlf": "1\t10\t5\t100\r\n2\t11\t4\t101\r\n",
    "blank lines": "1\t10\t5\t100\n\n2\t11\t4\t101\n\n\n3\t12\t3\t102\n",
    "empty fields": "1\t10\t5\t100\n\t\t\t\n2\t11\t4\t101\n",
    "spaces": " 1\t10 \t 5\t100\n  \n",
    "quotes": '"1"\t"1\t0"\t5\t100\n"2\t11\t4\t101\n',
    "short row": "1\t10\t5\t100\n2\t11\t4\n",
    "long row": "1\t10\t5\t100\n2\t11\t4\t101\t9\n",
    "unicode": "ü\t😀\t5\t100\n١٢\tx y\t4\t101\n",
    "nul": "1\t1\x000\t5\t100\n",
    "bom": "\ufeff1\t10\t5\t100\n",
    "colons in values": "1:5\t10\t5\t100\n2\t:11\t4\t101:\n",
    "empty values": "1\t\t5\t100\n\t11\t4\t101\n",
}
COLON_LINES = {  # MovieLens "::" lines Arrow splits at ":" (the empty fields between must be all there is)
    "tab in a value": "1::2::3::4\n5\t6::7::8::9\n",
    "trailing separator": "1::2::3::4::\n",
    "leading separator": "::1::2::3\n",
    "odd run": "1:::2::3::4\n",
    "even run": "1::::3::4\n1::2::3::4\n",
}


@pytest.mark.parametrize(
    "name, kind",
    [(name, kind) for name in sorted(BLOCKS) for kind in ("names", "header", "colons")]
    + [(name, "raw colons") for name in sorted(COLON_LINES)],
)
def test_arrow_blocks_read_as_pandas_does(tmp_path, monkeypatch, name, kind):
    """Arrow's CSV reader (the out-of-core fast path) and the readers' pandas parser give the same rows,
    line numbers and errors, block by block, whatever the lines hold."""
    text = BLOCKS.get(name) or COLON_LINES[name]
    options = {"sep": "\t", "header": False, "names": chunked.readers.RATING_NAMES}
    if kind == "raw colons":
        options["sep"] = "::"
    elif kind == "header":
        text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + text
        options = {"sep": "\t", "header": True, "names": None}
    elif kind == "colons":
        text = text.replace("\t", "::")
        options["sep"] = "::"
    path = tmp_path / "log.txt"
    path.write_bytes(text.encode())

    def read(fast: bool):
        if not fast:
            monkeypatch.setattr(chunked, "_arrow_rows", lambda *args: None)
        try:
            return [
                df
                for block in (8, 40, 1000)
                for df in chunked.delimited_chunks(path, block_bytes=block, **options)
            ]
        except DataError as err:
            return str(err)
        finally:
            monkeypatch.undo()

    fast, reference = read(True), read(False)
    if isinstance(reference, str):
        assert fast == reference
    else:
        assert len(fast) == len(reference)
        for a, b in zip(fast, reference, strict=True):
            pd.testing.assert_frame_equal(a, b)


def test_arrow_number_casts_are_pythons(monkeypatch):
    """Numbers cast by Arrow where they are plain, by pandas on Python objects otherwise: the same values,
    dtypes and errors."""
    from data_prep import readers

    columns = [
        ["1", "+5", "007"], ["-0", "5"], [" 5", "6"], ["5.0", "4.5"], ["1e3", "2"], ["1_0"], ["٥"],
        ["99999999999999999999", "1"], ["+5", "9007199254740993"], ["nan"], ["inf", "1"], [".5", "5."],
        ["1e400"], ["1e-400"], ["0x10"], ["0X1F", "2"], ["Infinity"], ["  4.5"], ["-1.25e-3", "3"],
        ["1.", "-.5", "1e5", "1E+5", "00.1"], ["-"], [""], ["1e"], ["."], ["1.2.3"],
        ["9223372036854775807"], ["9223372036854775808"], ["-9223372036854775808"],
        ["0.1", "0.30000000000000004", "2.2250738585072014e-308", "4.9e-324", "1.7976931348623157e308"],
        ["4611686018427387904"], ["4611686018427387903.0"],
    ]  # fmt: skip

    def parse(values):
        try:
            out = readers.parse_numbers(
                pd.Series(values, dtype=str, index=range(2, 2 + len(values))), Path("f"), "x"
            )
            return str(out.dtype), out.tolist()
        except DataError as err:
            return str(err)

    fast = [parse(values) for values in columns]
    monkeypatch.setattr(readers, "_arrow_cast", lambda *args: None)
    assert fast == [parse(values) for values in columns]
