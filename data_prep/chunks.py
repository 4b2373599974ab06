"""Interaction files read a piece at a time, for the out-of-core build.

Each piece goes through the very parsers of :mod:`data_prep.readers` (``parse_delimited``,
``interaction_frame``, ``json_records``), offset to its place in the file, so the rows, their line
index and the one-line errors on malformed data are those of the in-memory readers. Text files are
cut at line ends (for quoted CSV, only where the quotes so far are balanced: a quoted field may span
lines); Parquet is read by row groups.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import readers
from data_prep.errors import DataError

BLOCK_BYTES = 64 * 2**20


def interactions_file(fmt: str, source: str | Path, item_meta: str | Path | None = None) -> Path:
    """The interaction (or review) file of a source, as its reader would pick it."""
    if fmt == "recbole":
        return readers.recbole_interactions_file(source)
    if fmt == "movielens":
        return readers.movielens_ratings_file(Path(source))[0]
    if fmt == "amazon":
        return readers._amazon_files(Path(source), item_meta)[0]
    return Path(source)


def interaction_chunks(
    fmt: str,
    source: str | Path,
    columns: readers.ColumnMap,
    item_meta: str | Path | None = None,
    block_bytes: int | None = None,
) -> Iterator[pd.DataFrame]:
    """``user, item, rating, timestamp`` (+ ``text`` for review sources) pieces of a source's interactions,
    indexed by line, in file order (blocks of ``block_bytes``, default :data:`BLOCK_BYTES`); a file
    without data rows is an error, as in memory."""
    path = interactions_file(fmt, source, item_meta)
    block_bytes = block_bytes or BLOCK_BYTES
    if fmt == "recbole":
        pieces = (
            readers._id_columns_frame(readers.recbole_columns(df, path), path)
            for df in delimited_chunks(path, block_bytes=block_bytes)
        )
    elif fmt == "movielens":
        sep = readers.movielens_ratings_file(Path(source))[1]
        pieces = (
            readers.ratings_frame(df, path)
            for df in delimited_chunks(
                path, sep=sep, header=False, names=readers.RATING_NAMES, block_bytes=block_bytes
            )
        )
    elif fmt == "amazon":
        pieces = (readers.amazon_reviews(records, path) for records in json_chunks(path, block_bytes))
    else:
        pieces = (readers.csv_interactions(df, path, columns) for df in frame_chunks(path, block_bytes))
    empty = True
    for piece in pieces:
        empty = False
        yield piece
    if empty:
        raise DataError("file has no data rows", file=path)


def _blocks(path: Path, block_bytes: int, quoted: bool) -> Iterator[bytes]:
    """The file's bytes (gunzipped by magic bytes) in blocks that end at a line end (with balanced
    quotes when ``quoted``)."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as fh:
            rest = b""
            while block := fh.read(block_bytes):
                rest += block
                cut = rest.rfind(b"\n") + 1
                while quoted and cut and rest.count(b'"', 0, cut) % 2:
                    cut = rest.rfind(b"\n", 0, cut - 1) + 1
                if cut:
                    yield rest[:cut]
                    rest = rest[cut:]
            if rest:
                yield rest
    except (OSError, EOFError) as err:
        if not gzipped:
            raise
        raise DataError(f"not a valid gzip file: {err}", file=path) from err


def delimited_chunks(
    path: Path,
    *,
    sep: str = "\t",
    header: bool = True,
    names: list[str] | None = None,
    encoding: str = "utf-8",
    quoting: int = csv.QUOTE_NONE,
    block_bytes: int = BLOCK_BYTES,
) -> Iterator[pd.DataFrame]:
    """:func:`data_prep.readers.read_delimited` a block at a time (the header line is put before every
    block); blocks left without data rows are skipped."""
    head, rows, lines = "", 0, 0
    for raw in _blocks(path, block_bytes, quoted=quoting != csv.QUOTE_NONE):
        text = readers.decode(raw, encoding, path, lines)
        lines += raw.count(b"\n")
        if header and not head:
            head = text[: text.find("\n") + 1] if "\n" in text else text
        elif header:
            text = head + text
        df, count = readers.parse_delimited(
            text, path, sep=sep, header=header, names=names, quoting=quoting, offset=rows
        )
        rows += count
        if len(df):
            yield df
    if not lines and not head:
        raise DataError("file is empty", file=path)


def json_chunks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[list[tuple[int, dict]]]:
    """:func:`data_prep.readers.json_records` a block of lines at a time."""
    number = 1
    for raw in _blocks(path, block_bytes, quoted=False):
        lines = readers.decode(raw, "utf-8", path, number - 1).splitlines()
        records = readers.json_records(lines, path, first=number)
        number += len(lines)
        if records:
            yield records


def frame_chunks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[pd.DataFrame]:
    """:func:`data_prep.readers.read_frame` a piece at a time: Parquet by record batches, CSV and TSV
    by blocks of lines."""
    kind = readers.table_kind(path)
    if kind not in readers.PARQUET:
        yield from delimited_chunks(
            path, sep="," if kind == ".csv" else "\t", quoting=csv.QUOTE_MINIMAL, block_bytes=block_bytes
        )
        return
    if not path.is_file():
        raise DataError("file not found", file=path)
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=max(1, block_bytes // 64))
        start = 1
        for batch in batches:
            df = pa.Table.from_batches([batch]).to_pandas()
            df.index = pd.RangeIndex(start, start + len(df))
            start += len(df)
            if len(df):
                yield df
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read Parquet: {err}", file=path) from err
