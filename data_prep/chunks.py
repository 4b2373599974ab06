"""Interaction files read a piece at a time, for the out-of-core build.

Each piece goes through the very parsers of :mod:`data_prep.readers` (``parse_delimited``,
``interaction_frame``, ``json_records``), offset to its place in the file, so the rows, their line
index and the one-line errors on malformed data are those of the in-memory readers. Text files are
cut at line ends (for quoted CSV, only where the quotes so far are balanced: a quoted field may span
lines); Parquet is read by row groups. Unquoted UTF-8 blocks (MovieLens, RecBole) are split into fields by
Arrow's CSV reader instead of pandas' wherever the two read them alike (:func:`_arrow_rows`; several
times faster); the fields then go through the same ``interaction_frame`` checks.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
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
    use_threads: bool = True,
) -> Iterator[pd.DataFrame]:
    """``user, item, rating, timestamp`` (+ ``text`` for review sources) pieces of a source's interactions,
    indexed by line, in file order (blocks of ``block_bytes``, default :data:`BLOCK_BYTES`); a file
    without data rows is an error, as in memory. ``use_threads``: Arrow may parse on its thread pool."""
    path = interactions_file(fmt, source, item_meta)
    block_bytes = block_bytes or BLOCK_BYTES
    if fmt == "recbole":
        pieces = (
            readers._id_columns_frame(readers.recbole_columns(df, path), path)
            for df in delimited_chunks(path, block_bytes=block_bytes, use_threads=use_threads)
        )
    elif fmt == "movielens":
        sep = readers.movielens_ratings_file(Path(source))[1]
        pieces = (
            readers.ratings_frame(df, path)
            for df in delimited_chunks(
                path,
                sep=sep,
                header=False,
                names=readers.RATING_NAMES,
                block_bytes=block_bytes,
                use_threads=use_threads,
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
    use_threads: bool = True,
) -> Iterator[pd.DataFrame]:
    """:func:`data_prep.readers.read_delimited` a block at a time (the header line is put before every
    block); blocks left without data rows are skipped. Unquoted UTF-8 blocks are read by Arrow's CSV
    reader where it reads them as pandas would (:func:`_arrow_rows`; ``use_threads``: on Arrow's thread
    pool), any other block by :func:`data_prep.readers.parse_delimited` itself."""
    head, rows, lines = "", 0, 0
    columns: list[str] | None = names if not header else None
    fast = quoting == csv.QUOTE_NONE and encoding == "utf-8"
    for raw in _blocks(path, block_bytes, quoted=quoting != csv.QUOTE_NONE):
        text = readers.decode(raw, encoding, path, lines)  # undecodable bytes: the reader's error
        lines += raw.count(b"\n")
        data = raw
        if header and not head:
            head = text[: text.find("\n") + 1] if "\n" in text else text
            data = raw[len(head.encode(encoding)) :]
            if fast:
                columns = _header_columns(head, path, sep, quoting)
        elif header:
            text = head + text
        parsed = _arrow_rows(data, sep, columns, use_threads) if fast and columns is not None else None
        if parsed is not None:
            df, count = readers.index_rows(parsed, header, rows)
        else:
            df, count = readers.parse_delimited(
                text, path, sep=sep, header=header, names=names, quoting=quoting, offset=rows
            )
        rows += count
        if len(df):
            yield df
    if not lines and not head:
        raise DataError("file is empty", file=path)


def _header_columns(head: str, path: Path, sep: str, quoting: int) -> list[str] | None:
    """The column names pandas reads from a header line (None when it cannot: the whole first block then
    goes through the reader, which says what is wrong)."""
    try:
        return list(readers.parse_delimited(head, path, sep=sep, header=True, quoting=quoting)[0].columns)
    except DataError:
        return None


# the dtype of parse_delimited's columns: pandas' default string dtype (Arrow-backed from pandas 3)
STRINGS = pd.Series([""], dtype=str).dtype


def _arrow_rows(data: bytes, sep: str, columns: list[str], use_threads: bool) -> pd.DataFrame | None:
    """Data lines (no header) split by Arrow's CSV reader: every field a string as written, one row per
    line. None for a block where pandas' parser might read something else: a carriage return, a NUL,
    an empty line, a row with another number of fields than ``columns``, a line longer than Arrow's
    block, invalid UTF-8 (without quoting, the two parsers agree on everything else).

    ``parse_delimited`` swaps a separator of several characters for a tab first. For one character
    repeated (MovieLens' ``::``) this splits at the character instead, without copying the block: the
    separators then leave empty fields between the values, which must be all there is between them (a
    line holding a tab, or the character alone, goes to the replacing path)."""
    width = 1
    if len(sep) > 1 and len(set(sep)) == 1 and b"\t" not in data:
        sep, width = sep[0], len(sep)
    elif len(sep) > 1:  # as parse_delimited does, on bytes: sep is ASCII, so no character spans it
        data, sep = data.replace(sep.encode(), b"\t"), "\t"
    if len(sep.encode()) != 1 or data[:1] == b"\n" or data[:3] == b"\xef\xbb\xbf":  # a byte order mark
        return None
    if any(mark in data for mark in (b"\r", b"\0", b"\n\n")):
        return None
    names = [str(i) for i in range(width * (len(columns) - 1) + 1)]
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(column_names=names, use_threads=use_threads),
            parse_options=pacsv.ParseOptions(
                delimiter=sep, quote_char=False, escape_char=False, ignore_empty_lines=False
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.large_string()),  # pandas holds these as they are
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                check_utf8=True,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    between = [i for i in range(len(names)) if i % width]
    if any(pc.any(pc.not_equal(table.column(i), "")).as_py() for i in between):
        return None
    table = table.select(list(range(0, len(names), width))).rename_columns(columns)
    return table.to_pandas(use_threads=use_threads).astype(STRINGS)


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
