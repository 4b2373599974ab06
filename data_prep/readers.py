"""One reader per source format, each returning validated tables (:class:`SourceTables`).

Every table is indexed by the 1-based line (or Parquet row) it came from, so that any later check
can name the exact place in the file. Readers only parse and validate; filtering, id maps and
splits happen in :mod:`data_prep.process` and :mod:`data_prep.splits`.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.errors import DataError

logger = logging.getLogger(__name__)

# Metadata fields whose RecBole ``token_seq`` values are lists (joined as "a, b, c" in text).
LIST_FIELDS = {"class", "genre", "genres", "categories", "category", "tags"}
# Friendlier names in item/user text.
FIELD_NAMES = {"class": "genres", "genre": "genres"}
# Postal codes identify a place rather than describe a person, so they stay out of user text.
SKIP_USER_FIELDS = {"zip_code", "zip", "zipcode"}
TITLE_FIELDS = ("movie_title", "title", "name")
YEAR_FIELDS = ("release_year", "year")


@dataclass
class SourceTables:
    """What a reader found: interactions plus optional metadata and reviews (all values are str
    except ``rating``/``timestamp``). ``items`` has ``item``, ``title`` and attribute columns;
    ``users`` has ``user`` and attribute columns; ``reviews`` has ``user``, ``item``, ``text``,
    ``timestamp``. ``files`` are hashed into the manifest."""

    interactions: pd.DataFrame
    interactions_file: Path
    items: pd.DataFrame | None = None
    items_file: Path | None = None
    users: pd.DataFrame | None = None
    users_file: Path | None = None
    reviews: pd.DataFrame | None = None
    files: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Shared parsing helpers
# ----------------------------------------------------------------------------------------------
def read_text(path: Path, encoding: str = "utf-8") -> str:
    """Whole file as text (gzip by magic bytes); undecodable bytes raise a DataError with the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", file=path)
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"not a valid gzip file: {err}", file=path) from err
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"cannot decode byte {raw[err.start : err.start + 1]!r} as {encoding} (position {err.start})",
            file=path,
            line=line,
        ) from err


def read_delimited(
    path: Path,
    *,
    sep: str = "\t",
    header: bool = True,
    names: list[str] | None = None,
    encoding: str = "utf-8",
    quoting: int = csv.QUOTE_NONE,
) -> pd.DataFrame:
    """Read a delimited text file as strings, indexed by physical line number, blank lines dropped.

    Multi-character separators (MovieLens ``::``) are swapped for a tab first so that pandas' fast C
    parser can be used.
    """
    text = read_text(path, encoding)
    if len(sep) > 1:
        text = text.replace(sep, "\t")
        sep = "\t"
    try:
        df = pd.read_csv(
            io.StringIO(text),
            sep=sep,
            header=0 if header else None,
            names=names if not header else None,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            quoting=quoting,
            skip_blank_lines=False,
            engine="c",
        )
    except pd.errors.EmptyDataError as err:
        raise DataError("file is empty", file=path) from err
    except pd.errors.ParserError as err:
        raise DataError(f"malformed row: {err}", file=path) from err
    df.index = np.arange(len(df)) + (2 if header else 1)
    blank = (df == "").all(axis=1)
    if blank.any():
        df = df[~blank]
    if df.empty:
        raise DataError("file has no data rows", file=path)
    return df


def require_columns(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    """Missing or misnamed columns: one error listing what was expected and what the file has."""
    for name in columns:
        if name not in df.columns:
            raise DataError(f"missing column; the file has {list(df.columns)}", file=path, line=1, field=name)


def parse_ids(series: pd.Series, path: Path, name: str) -> pd.Series:
    """Ids stay strings (raw ids round-trip exactly); an empty id is an error."""
    series = series.astype(str).str.strip()
    empty = series == ""
    if empty.any():
        raise DataError("empty id", file=path, line=int(empty.idxmax()), field=name)
    return series


def parse_numbers(series: pd.Series, path: Path, name: str) -> pd.Series:
    """Numbers as float64 (int64 when all integral, e.g. unix timestamps); the first bad value is an error."""
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        values = series.astype("float64")
        bad = ~np.isfinite(values)
    else:
        values = pd.to_numeric(series.astype(str).str.strip(), errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype="float64", na_value=np.nan))
    if bad.any():
        first = series.index[int(np.argmax(np.asarray(bad)))]
        raise DataError(f"not a number: {series.loc[first]!r}", file=path, line=int(first), field=name)
    values = values.astype("float64")
    if (values == np.floor(values)).all() and values.abs().max() < 2**62:
        return values.astype("int64")
    return values


def interaction_frame(
    df: pd.DataFrame, path: Path, *, user: str, item: str, rating: str | None, timestamp: str | None
) -> pd.DataFrame:
    """Normalise to ``user, item, rating, timestamp``.

    Without a rating column every interaction counts 1.0 (implicit feedback); without a timestamp
    the line number stands in, so "latest" and "temporal" follow file order.
    """
    require_columns(df, [c for c in (user, item, rating, timestamp) if c is not None], path)
    out = pd.DataFrame(index=df.index)
    out["user"] = parse_ids(df[user], path, user)
    out["item"] = parse_ids(df[item], path, item)
    out["rating"] = parse_numbers(df[rating], path, rating).astype("float64") if rating else 1.0
    out["timestamp"] = parse_numbers(df[timestamp], path, timestamp) if timestamp else df.index.to_numpy()
    return out


def metadata_frame(
    df: pd.DataFrame,
    path: Path,
    *,
    id_column: str,
    key: str,
    list_fields: set[str] = LIST_FIELDS,
    list_sep: str | None = None,
    skip: set[str] = frozenset(),
) -> pd.DataFrame:
    """Metadata as ``key`` (item/user), ``title`` (items only, may be absent) and attribute columns.

    Title candidates (``movie_title``/``title``/``name``) become ``title``, with a release year appended
    in parentheses when there is one; list-valued fields are re-joined with ", ".
    """
    require_columns(df, [id_column], path)
    out = pd.DataFrame(index=df.index)
    out[key] = parse_ids(df[id_column], path, id_column)
    duplicated = out[key].duplicated()
    if duplicated.any():
        line = int(duplicated.idxmax())
        raise DataError(
            f"duplicate metadata row for {out[key].loc[line]!r}", file=path, line=line, field=id_column
        )
    rest = [c for c in df.columns if c != id_column and c.lower() not in skip]
    if key == "item":
        title_col = next((c for c in TITLE_FIELDS if c in rest), None)
        year_col = next((c for c in YEAR_FIELDS if c in rest), None)
        title = df[title_col].astype(str).str.strip() if title_col else pd.Series("", index=df.index)
        if year_col:
            year = df[year_col].astype(str).str.strip()
            title = title.where(year == "", title + " (" + year + ")").str.strip()
        out["title"] = title
        rest = [c for c in rest if c not in (title_col, year_col)]
    for name in rest:
        values = df[name].astype(str).str.strip()
        if name.lower() in list_fields:
            values = values.str.split(list_sep).str.join(", ")
        out[FIELD_NAMES.get(name.lower(), name)] = values
    return out


# ----------------------------------------------------------------------------------------------
# RecBole atomic files
# ----------------------------------------------------------------------------------------------
def _recbole_table(path: Path) -> pd.DataFrame:
    """RecBole atomic file: tab-separated, header cells ``name:type``; the types are dropped."""
    df = read_delimited(path)
    df.columns = [str(c).split(":", 1)[0].strip() for c in df.columns]
    return df


def _recbole_file(directory: Path, suffix: str, required: bool) -> Path | None:
    preferred = directory / f"{directory.name}.{suffix}"
    if preferred.is_file():
        return preferred
    found = sorted(directory.glob(f"*.{suffix}"))
    if len(found) > 1:
        raise DataError(
            f"several .{suffix} files ({[p.name for p in found]}); expected {preferred.name}", file=directory
        )
    if not found and required:
        raise DataError(f"no .{suffix} file found (expected {preferred.name})", file=directory)
    return found[0] if found else None


def read_recbole(path: str | Path) -> SourceTables:
    """RecBole atomic files ``NAME.inter`` (+ optional ``NAME.item``, ``NAME.user``) in a directory.

    ``.inter`` needs ``user_id`` and ``item_id``; ``rating`` and ``timestamp`` are used when present.
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if not directory.is_dir():
        raise DataError("not a directory of RecBole atomic files", file=path)
    inter_path = path if path.is_file() else _recbole_file(directory, "inter", required=True)
    inter = _recbole_table(inter_path)
    interactions = interaction_frame(
        inter,
        inter_path,
        user="user_id",
        item="item_id",
        rating="rating" if "rating" in inter.columns else None,
        timestamp="timestamp" if "timestamp" in inter.columns else None,
    )
    tables = SourceTables(interactions=interactions, interactions_file=inter_path, files=[inter_path])
    item_path = _recbole_file(directory, "item", required=False)
    if item_path is not None:
        tables.items = metadata_frame(_recbole_table(item_path), item_path, id_column="item_id", key="item")
        tables.items_file = item_path
        tables.files.append(item_path)
    user_path = _recbole_file(directory, "user", required=False)
    if user_path is not None:
        tables.users = metadata_frame(
            _recbole_table(user_path), user_path, id_column="user_id", key="user", skip=SKIP_USER_FIELDS
        )
        tables.users_file = user_path
        tables.files.append(user_path)
    return tables


# ----------------------------------------------------------------------------------------------
# Pre-split directory
# ----------------------------------------------------------------------------------------------
SPLITS = ("train", "valid", "test")


def read_presplit(directory: str | Path) -> dict[str, pd.DataFrame]:
    """``train.tsv``, ``valid.tsv``, ``test.tsv`` with ``user_id``, ``item_id`` (+ ``rating``, ``timestamp``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("pre-split directory not found", file=directory)
    out = {}
    for split in SPLITS:
        path = directory / f"{split}.tsv"
        df = read_delimited(path)
        out[split] = interaction_frame(
            df,
            path,
            user="user_id",
            item="item_id",
            rating="rating" if "rating" in df.columns else None,
            timestamp="timestamp" if "timestamp" in df.columns else None,
        )
    return out
