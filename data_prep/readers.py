"""One reader per source format, each returning validated tables (:class:`SourceTables`).

Every table is indexed by the 1-based line (or Parquet row) it came from, so that any later check
can name the exact place in the file. Readers only parse and validate; filtering, id maps and
splits happen in :mod:`data_prep.process` and :mod:`data_prep.splits`.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.errors import DataError
from data_prep.splits import SPLITS

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
    ``timestamp``. ``files`` are hashed into the manifest. ``extra_metadata_ok`` marks sources whose
    metadata normally lists more items than the interactions (they are dropped, not an error)."""

    interactions: pd.DataFrame
    interactions_file: Path
    items: pd.DataFrame | None = None
    items_file: Path | None = None
    users: pd.DataFrame | None = None
    users_file: Path | None = None
    reviews: pd.DataFrame | None = None
    files: list[Path] = field(default_factory=list)
    extra_metadata_ok: bool = False

    def add_items(self, items: pd.DataFrame, path: Path) -> None:
        self.items, self.items_file = items, path
        self.files.append(path)

    def add_users(self, users: pd.DataFrame, path: Path) -> None:
        self.users, self.users_file = users, path
        self.files.append(path)


# What a reader called with ``interactions=False`` holds in place of the interaction table.
NOT_READ = pd.DataFrame({"user": [], "item": [], "rating": [], "timestamp": []}, dtype=object)


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
    return decode(raw, encoding, path)


def decode(raw: bytes, encoding: str, path: Path, lines_before: int = 0) -> str:
    """Bytes of ``path`` that follow its first ``lines_before`` lines, as text; undecodable bytes raise a
    DataError naming the line (``position``: the byte's offset in ``raw``)."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise DataError(
            f"cannot decode byte {raw[err.start : err.start + 1]!r} as {encoding} (position {err.start})",
            file=path,
            line=lines_before + raw.count(b"\n", 0, err.start) + 1,
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
    df, _ = parse_delimited(
        read_text(path, encoding), path, sep=sep, header=header, names=names, quoting=quoting
    )
    if df.empty:
        raise DataError("file has no data rows", file=path)
    return df


def parse_delimited(
    text: str,
    path: Path,
    *,
    sep: str = "\t",
    header: bool = True,
    names: list[str] | None = None,
    quoting: int = csv.QUOTE_NONE,
    offset: int = 0,
) -> tuple[pd.DataFrame, int]:
    """:func:`read_delimited` of ``text``, a piece of ``path`` (with the header line first when there is
    one) that starts ``offset`` rows into the file; returns the rows, blank ones dropped (maybe none
    left), and how many rows the piece held (the next piece's ``offset``)."""
    if len(sep) > 1:
        text = text.replace(sep, "\t")
        sep = "\t"
    try:
        with warnings.catch_warnings():
            # pandas only warns (and drops data) when a row has more fields than the header
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(
                io.StringIO(text),
                sep=sep,
                header=0 if header else None,
                names=names if not header else None,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                quoting=quoting,
                index_col=False,
                skip_blank_lines=False,
                engine="c",
            )
    except pd.errors.EmptyDataError as err:
        raise DataError("file is empty", file=path) from err
    except pd.errors.ParserWarning as err:
        raise _long_row(text, sep, quoting, path, offset) from err
    except pd.errors.ParserError as err:
        found = re.search(r"line (\d+)", str(err))
        raise DataError(
            f"malformed row: {err}", file=path, line=int(found.group(1)) + offset if found else None
        ) from err
    if header:
        first = next(
            csv.reader(io.StringIO(text[: text.find("\n") + 1 or None]), delimiter=sep, quoting=quoting), []
        )
        require_unique_columns([c.strip() for c in first], path)
    return index_rows(df, header, offset)


def index_rows(df: pd.DataFrame, header: bool, offset: int) -> tuple[pd.DataFrame, int]:
    """Rows of a parsed piece (one per line, blank ones included) indexed by their line in the file, then
    the blank ones (every field empty) dropped; and how many rows the piece held."""
    rows = len(df)
    df.index = np.arange(rows) + (2 if header else 1) + offset
    blank = (df == "").all(axis=1)
    if blank.any():
        df = df[~blank]
    return df, rows


def _long_row(text: str, sep: str, quoting: int, path: Path, offset: int = 0) -> DataError:
    """Find the first row with more fields than the first row (only called once pandas complained)."""
    reader = csv.reader(io.StringIO(text), delimiter=sep, quoting=quoting)
    width = None
    for row in reader:
        if not row:
            continue
        if width is None:
            width = len(row)
        elif len(row) > width:
            return DataError(
                f"malformed row: expected {width} fields, found {len(row)}",
                file=path,
                line=reader.line_num + offset,
            )
    return DataError("malformed row: more fields than the header", file=path)


def require_unique_columns(columns: list[str], path: Path) -> None:
    """A header naming a column twice: which of the two is meant is a guess, so it is an error."""
    seen = set()
    for name in columns:
        if name in seen:
            raise DataError(
                "column named twice in the header; rename or drop one", file=path, line=1, field=name
            )
        seen.add(name)


def require_columns(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    """Missing or misnamed columns: one error listing what was expected and what the file has."""
    for name in columns:
        if name not in df.columns:
            raise DataError(f"missing column; the file has {list(df.columns)}", file=path, line=1, field=name)


def parse_ids(series: pd.Series, path: Path, name: str) -> pd.Series:
    """Ids as strings, whatever the file format typed them as.

    Text ids are kept as written, stripped (raw ids round-trip exactly; Unicode digits stay as written:
    ``"١٢"`` is not ``"12"``). Numbers (Parquet, JSON) are written as integers, so that one id matches
    across files of different types: ``12``, ``12.0`` and ``"12"`` are all ``"12"``. Bytes are decoded
    as UTF-8. A `DataError` names the row of the first id that is missing (empty, None, NaN), fractional
    or too large for a float to hold exactly, a boolean, a list or mapping, or undecodable bytes.
    """
    missing = series.isna().to_numpy()
    if missing.any():
        raise DataError(
            "missing id (None or NaN)", file=path, line=int(series.index[missing.argmax()]), field=name
        )
    if pd.api.types.is_integer_dtype(series):  # whole columns at once: the common typed cases
        series = series.astype("int64").astype(str)
    elif pd.api.types.is_float_dtype(series):
        values = series.to_numpy(dtype="float64")
        bad = (values != np.floor(values)) | (np.abs(values) >= 2**53)
        if bad.any():
            _one_id(values[bad.argmax()], path, series.index[bad.argmax()], name)
        series = pd.Series(values.astype(np.int64).astype(str), index=series.index)
    elif pd.api.types.infer_dtype(series, skipna=False) != "string":
        series = pd.Series([_one_id(v, path, line, name) for line, v in series.items()], index=series.index)
    series = series.astype(str).str.strip()
    empty = series == ""
    if empty.any():
        raise DataError("empty id", file=path, line=int(empty.idxmax()), field=name)
    return series


def _one_id(value: object, path: Path, line: int, name: str) -> str:
    """One id of a column that is not all strings (see :func:`parse_ids`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        problem = f"a boolean ({value}), not an id"
    elif isinstance(value, (int, np.integer)):
        return str(int(value))
    elif isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            problem = "bytes that are not UTF-8 text"
    elif isinstance(value, (float, np.floating)):
        if np.isfinite(value) and value == np.floor(value) and abs(value) < 2**53:
            return str(int(value))
        problem = f"{float(value)!r} is not a whole-number id"
    else:
        problem = f"not an id: a {type(value).__name__} value ({str(value)[:40]})"
    raise DataError(problem, file=path, line=int(line), field=name)


def parse_numbers(series: pd.Series, path: Path, name: str) -> pd.Series:
    """Numbers as float64 (int64 when all integral, e.g. unix timestamps); the first bad value is an error.

    Whole-column casts are tried first (several times faster than ``pd.to_numeric`` on 1M+ strings);
    only when they fail is the column parsed value by value to find the offending row.
    """
    original = series
    if pd.api.types.is_datetime64_any_dtype(series):  # Parquet timestamps -> unix seconds (NaT: NaN)
        nanoseconds = series.dt.tz_convert(None) if getattr(series.dt, "tz", None) else series  # UTC
        seconds = nanoseconds.to_numpy(dtype="datetime64[ns]").view("int64") // 10**9
        series = pd.Series(np.where(series.isna().to_numpy(), np.nan, seconds), index=series.index)
    if pd.api.types.is_bool_dtype(series):
        series = series.astype(object)
    if not pd.api.types.is_numeric_dtype(series):
        whole = _arrow_cast(series, pa.int64())
        if whole is not None:
            return whole
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            return series.astype("int64")
        decimal = _arrow_cast(series, pa.float64())
        if decimal is not None:
            series = decimal
        else:
            try:
                series = series.astype("float64")
            except (ValueError, TypeError):
                series = pd.to_numeric(series.astype(str).str.strip(), errors="coerce")
    values = series.astype("float64")
    bad = ~np.isfinite(values.to_numpy(dtype="float64", na_value=np.nan))
    if bad.any():
        first = series.index[int(np.argmax(bad))]
        value = original.loc[first]
        value = value.item() if isinstance(value, np.generic) else value  # 'nan', not 'np.float64(nan)'
        raise DataError(f"not a number: {value!r}", file=path, line=int(first), field=name)
    if (values == np.floor(values)).all() and values.abs().max() < 2**62:
        return values.astype("int64")
    return values


# Numbers as both Arrow and Python read them alike (Arrow also takes hexadecimal "0x10", Python also
# spaces, "+", "_" and non-ASCII digits): only columns of these go through Arrow's cast.
PLAIN = {
    pa.int64(): r"^-?[0-9]+$",
    pa.float64(): r"^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$",
}


def _arrow_cast(series: pd.Series, kind: pa.DataType) -> pd.Series | None:
    """An Arrow-backed string column of plain numbers (:data:`PLAIN`) cast by Arrow to ``kind`` (int64
    or float64): the value Python's casts give, without a Python object per value. None when a value
    is not plain, Arrow refuses it (out of range) or the column is not Arrow strings: then pandas'
    casts decide."""
    if not (isinstance(series.dtype, pd.StringDtype) and series.dtype.storage == "pyarrow"):
        return None
    values = pa.chunked_array(pa.array(series.array))
    if values.null_count or not pc.all(pc.match_substring_regex(values, PLAIN[kind])).as_py():
        return None
    try:
        cast = pc.cast(values, kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return pd.Series(cast.to_numpy(), index=series.index)


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


def _id_columns_frame(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """RecBole and pre-split files: ``user_id``, ``item_id``, and ``rating``/``timestamp`` if present."""
    return interaction_frame(
        df,
        path,
        user="user_id",
        item="item_id",
        rating="rating" if "rating" in df.columns else None,
        timestamp="timestamp" if "timestamp" in df.columns else None,
    )


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
    return recbole_columns(read_delimited(path), path)


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


def recbole_interactions_file(path: str | Path) -> Path:
    """The ``.inter`` file: ``path`` itself, or the one in the directory ``path``."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if not directory.is_dir():
        raise DataError("not a directory of RecBole atomic files", file=path)
    return path if path.is_file() else _recbole_file(directory, "inter", required=True)


def recbole_columns(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """RecBole header cells are ``name:type``; the types are dropped."""
    df.columns = [str(c).split(":", 1)[0].strip() for c in df.columns]
    require_unique_columns(list(df.columns), path)
    return df


def read_recbole(path: str | Path, interactions: bool = True) -> SourceTables:
    """RecBole atomic files ``NAME.inter`` (+ optional ``NAME.item``, ``NAME.user``) in a directory.

    ``.inter`` needs ``user_id`` and ``item_id``; ``rating`` and ``timestamp`` are used when present.
    Without ``interactions`` the ``.inter`` file is left unread (the out-of-core build reads it in pieces).
    """
    inter_path = recbole_interactions_file(path)
    directory = inter_path.parent
    frame = _id_columns_frame(_recbole_table(inter_path), inter_path) if interactions else NOT_READ
    tables = SourceTables(interactions=frame, interactions_file=inter_path, files=[inter_path])
    item_path = _recbole_file(directory, "item", required=False)
    if item_path is not None:
        tables.add_items(
            metadata_frame(_recbole_table(item_path), item_path, id_column="item_id", key="item"), item_path
        )
    user_path = _recbole_file(directory, "user", required=False)
    if user_path is not None:
        tables.add_users(
            metadata_frame(
                _recbole_table(user_path), user_path, id_column="user_id", key="user", skip=SKIP_USER_FIELDS
            ),
            user_path,
        )
    return tables


# ----------------------------------------------------------------------------------------------
# Pre-split directory
# ----------------------------------------------------------------------------------------------
def read_presplit(directory: str | Path) -> dict[str, pd.DataFrame]:
    """``train.tsv``, ``valid.tsv``, ``test.tsv`` with ``user_id``, ``item_id`` (+ ``rating``, ``timestamp``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("pre-split directory not found", file=directory)
    out = {}
    for split in SPLITS:
        path = directory / f"{split}.tsv"
        df = read_delimited(path)
        out[split] = _id_columns_frame(df, path)
    return out


# ----------------------------------------------------------------------------------------------
# Raw MovieLens (ml-100k; ml-1m / ml-10m "::" files)
# ----------------------------------------------------------------------------------------------
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
# ml-1m README: users.dat codes age bands and occupations.
ML1M_AGES = {
    "1": "under 18",
    "18": "18-24",
    "25": "25-34",
    "35": "35-44",
    "45": "45-49",
    "50": "50-55",
    "56": "56+",
}
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
]  # fmt: skip
NO_GENRE = {"unknown", "(no genres listed)"}


def _read_movielens_meta(path: Path, sep: str, names: list[str]) -> pd.DataFrame:
    """MovieLens metadata is latin-1 in ml-100k/ml-1m and UTF-8 later; latin-1 is the fallback."""
    try:
        return read_delimited(path, sep=sep, header=False, names=names, encoding="utf-8")
    except DataError as err:
        if not isinstance(err.__cause__, UnicodeDecodeError):
            raise
        logger.info("%s is not UTF-8; reading it as latin-1", path)
        return read_delimited(path, sep=sep, header=False, names=names, encoding="latin-1")


def _check_width(df: pd.DataFrame, path: Path, names: list[str]) -> None:
    """Headerless files: a short row shows up as empty trailing fields."""
    short = df[names[-1]] == ""
    if short.any():
        line = int(df.index[int(np.argmax(short.to_numpy()))])
        raise DataError(f"expected {len(names)} fields", file=path, line=line, field=names[-1])


def _join_genres(genres: pd.Series) -> pd.Series:
    return genres.map(lambda gs: ", ".join(g for g in gs if g and g not in NO_GENRE))


def read_movielens(path: str | Path, interactions: bool = True) -> SourceTables:
    """A MovieLens directory: ml-100k (``u.data``, ``u.item``, ``u.user``) or ml-1m/ml-10m
    (``ratings.dat``, ``movies.dat``, ``users.dat`` with ``::`` separators). Without ``interactions``
    the ratings are left unread (the out-of-core build reads them in pieces)."""
    directory = Path(path)
    data, sep = movielens_ratings_file(directory)
    tables = SourceTables(
        interactions=ratings_frame(read_delimited(data, sep=sep, header=False, names=RATING_NAMES), data)
        if interactions
        else NOT_READ,
        interactions_file=data,
        files=[data],
    )
    return _read_ml100k(directory, tables) if sep == "\t" else _read_ml_dat(directory, tables)


def movielens_ratings_file(directory: Path) -> tuple[Path, str]:
    """The ratings file of a MovieLens directory and its separator."""
    if (directory / "u.data").is_file():
        return directory / "u.data", "\t"
    if (directory / "ratings.dat").is_file():
        return directory / "ratings.dat", "::"
    raise DataError("no MovieLens ratings found (expected u.data or ratings.dat)", file=directory)


RATING_NAMES = ["user_id", "item_id", "rating", "timestamp"]


def ratings_frame(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """MovieLens ratings rows (:data:`RATING_NAMES`, no header) -> interactions."""
    _check_width(df, path, RATING_NAMES)
    return interaction_frame(df, path, user="user_id", item="item_id", rating="rating", timestamp="timestamp")


def _read_ml100k(directory: Path, tables: SourceTables) -> SourceTables:
    item_path = directory / "u.item"
    if item_path.is_file():
        genre_path = directory / "u.genre"
        genres = ML100K_GENRES
        if genre_path.is_file():
            genre_table = read_delimited(genre_path, sep="|", header=False, names=["genre", "index"])
            genres = genre_table["genre"].tolist()
        names = [
            "item_id",
            "title",
            "release_date",
            "video_release_date",
            "url",
            *[f"g{i}" for i in range(len(genres))],
        ]
        raw = _read_movielens_meta(item_path, "|", names)
        _check_width(raw, item_path, names)
        flags = raw[names[5:]].to_numpy() == "1"
        raw["genres"] = _join_genres(pd.Series([np.asarray(genres)[row] for row in flags], index=raw.index))
        tables.add_items(
            metadata_frame(
                raw[["item_id", "title", "genres"]],
                item_path,
                id_column="item_id",
                key="item",
                list_fields=set(),
            ),
            item_path,
        )
    user_path = directory / "u.user"
    if user_path.is_file():
        names = ["user_id", "age", "gender", "occupation", "zip_code"]
        raw = _read_movielens_meta(user_path, "|", names)
        _check_width(raw, user_path, names)
        tables.add_users(
            metadata_frame(raw, user_path, id_column="user_id", key="user", skip=SKIP_USER_FIELDS), user_path
        )
    return tables


def _read_ml_dat(directory: Path, tables: SourceTables) -> SourceTables:
    item_path = directory / "movies.dat"
    if item_path.is_file():
        names = ["item_id", "title", "genres"]
        raw = _read_movielens_meta(item_path, "::", names)
        _check_width(raw, item_path, names)
        raw["genres"] = _join_genres(raw["genres"].str.split("|"))
        tables.add_items(
            metadata_frame(raw, item_path, id_column="item_id", key="item", list_fields=set()), item_path
        )
    user_path = directory / "users.dat"
    if user_path.is_file():
        names = ["user_id", "gender", "age", "occupation", "zip_code"]
        raw = _read_movielens_meta(user_path, "::", names)
        _check_width(raw, user_path, names)
        raw["age"] = raw["age"].map(ML1M_AGES).fillna(raw["age"])
        occupations = {str(code): name for code, name in enumerate(ML1M_OCCUPATIONS)}
        raw["occupation"] = raw["occupation"].map(occupations).fillna(raw["occupation"])
        tables.add_users(
            metadata_frame(
                raw[["user_id", "age", "gender", "occupation", "zip_code"]],
                user_path,
                id_column="user_id",
                key="user",
                skip=SKIP_USER_FIELDS,
            ),
            user_path,
        )
    return tables


# ----------------------------------------------------------------------------------------------
# Amazon reviews (2014 / 2018 JSON lines, plain or gzipped) + metadata
# ----------------------------------------------------------------------------------------------
MAX_JSON_DEPTH = 100  # review and metadata records nest a few levels; far more is a damaged file
_TOO_DEEP = f"nested more than {MAX_JSON_DEPTH} levels deep: not a review or metadata record"


def _depth(line: str) -> int:
    """Deepest bracket nesting of a line (brackets inside strings count too: an upper bound)."""
    if sum(line.count(c) for c in "[{(") <= MAX_JSON_DEPTH:  # the usual case, without a per-character pass
        return 0
    chars = np.frombuffer(line.encode("utf-8", "replace"), dtype=np.uint8)
    step = np.isin(chars, list(b"[{(")).astype(np.int64) - np.isin(chars, list(b"]})"))
    return int(np.cumsum(step).max())


def _json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line, record) pairs. The 2014 metadata files are Python literals rather than JSON, so a line
    that is not JSON is tried with ``ast.literal_eval`` (safe: literals only) before it is an error."""
    records = json_records(read_text(path).splitlines(), path)
    if not records:
        raise DataError("file has no data rows", file=path)
    return records


def json_records(lines: list[str], path: Path, first: int = 1) -> list[tuple[int, dict]]:
    """(line, record) pairs of ``lines`` of ``path``, the first of them being line ``first``; blank
    lines skipped."""
    import ast
    import json

    records = []
    for number, line in enumerate(lines, start=first):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError as err:
            raise DataError(_TOO_DEEP, file=path, line=number) from err
        except json.JSONDecodeError as err:
            if _depth(line) > MAX_JSON_DEPTH:  # bounds the literal_eval fallback too
                raise DataError(_TOO_DEEP, file=path, line=number) from err
            try:
                record = ast.literal_eval(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise DataError(f"not valid JSON: {err.msg}", file=path, line=number) from err
        if not isinstance(record, dict):
            raise DataError("expected a JSON object per line", file=path, line=number)
        records.append((number, record))
    return records


def _flatten(value: object) -> list[str]:
    """Categories come as a list (2018) or a list of category paths (2014); description as str or list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flatten(item)]
    text = str(value).strip()
    return [text] if text else []


def _unique_join(values: list[str], sep: str) -> str:
    return sep.join(dict.fromkeys(values))


def _amazon_files(path: Path, meta: str | Path | None) -> tuple[Path, Path | None]:
    if path.is_file():
        return path, Path(meta) if meta else None
    if not path.is_dir():
        raise DataError("not found", file=path)
    found = [
        p for p in sorted(path.iterdir()) if p.name.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz"))
    ]
    metas = [p for p in found if "meta" in p.name]
    reviews = [p for p in found if "meta" not in p.name]
    if len(reviews) != 1:
        raise DataError(
            f"expected one review file (*.json[l][.gz]), found {[p.name for p in reviews]}", file=path
        )
    if meta is None and len(metas) > 1:
        raise DataError(f"several metadata files {[p.name for p in metas]}; pass --item_meta", file=path)
    return reviews[0], Path(meta) if meta else (metas[0] if metas else None)


def amazon_reviews(records: list[tuple[int, dict]], path: Path) -> pd.DataFrame:
    """Review records -> interactions with their review ``text`` (the review, else its summary)."""
    required = ("reviewerID", "asin", "overall", "unixReviewTime")
    rows = {key: [] for key in (*required, "text")}
    lines = []
    for number, record in records:
        for key in required:
            if key not in record:
                raise DataError("missing field", file=path, line=number, field=key)
            rows[key].append(record[key])
        text = str(record.get("reviewText") or "").strip() or str(record.get("summary") or "").strip()
        rows["text"].append(text)
        lines.append(number)
    index = pd.Index(lines)
    frame = pd.DataFrame({k: pd.Series(v, index=index, dtype=object) for k, v in rows.items()})
    interactions = interaction_frame(
        frame, path, user="reviewerID", item="asin", rating="overall", timestamp="unixReviewTime"
    )
    return interactions.assign(text=frame["text"].astype(str))


def read_amazon(path: str | Path, meta: str | Path | None = None, interactions: bool = True) -> SourceTables:
    """Amazon review dumps (2014: ``reviews_*.json.gz``; 2018: ``*.json.gz``) and their metadata
    (``meta_*.json.gz``), given as files or a directory holding one of each.

    The published metadata covers a whole category while review files are often 5-core subsets,
    so metadata for products without reviews is expected here and dropped (``extra_metadata_ok``).
    Without ``interactions`` the review file is left unread (the out-of-core build reads it in pieces).
    """
    review_path, meta_path = _amazon_files(Path(path), meta)
    if interactions:
        frame = amazon_reviews(_json_lines(review_path), review_path)
        reviews = frame[["user", "item", "timestamp", "text"]]
    else:
        frame, reviews = NOT_READ, None
    tables = SourceTables(
        interactions=frame.drop(columns="text", errors="ignore"),
        interactions_file=review_path,
        reviews=reviews,
        files=[review_path],
        extra_metadata_ok=True,
    )
    if meta_path is not None:
        meta_rows = []
        for number, record in _json_lines(meta_path):
            if "asin" not in record:
                raise DataError("missing field", file=meta_path, line=number, field="asin")
            price = record.get("price")
            meta_rows.append(
                {
                    "line": number,
                    "asin": str(record["asin"]),
                    "title": " ".join(_flatten(record.get("title"))),
                    "brand": " ".join(_flatten(record.get("brand"))),
                    "categories": _unique_join(
                        _flatten(record.get("categories", record.get("category"))), ", "
                    ),
                    "price": "" if price in (None, "") else str(price),
                    "description": " ".join(_flatten(record.get("description"))),
                }
            )
        table = pd.DataFrame(meta_rows).set_index("line")
        table.index.name = None
        tables.add_items(
            metadata_frame(table, meta_path, id_column="asin", key="item", list_fields=set()), meta_path
        )
    return tables


# ----------------------------------------------------------------------------------------------
# Generic CSV / TSV / Parquet with a column mapping
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnMap:
    """Which source columns hold the user, item and (optional) rating, timestamp and review text."""

    user: str = "user_id"
    item: str = "item_id"
    rating: str | None = None
    timestamp: str | None = None
    text: str | None = None


PARQUET = (".parquet", ".pq")


def table_kind(path: Path) -> str:
    """The suffix that says a table's type (``.gz`` skipped)."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return suffixes[-1] if suffixes else ""


def read_frame(path: str | Path) -> pd.DataFrame:
    """CSV (``,``), TSV (``.tsv``/``.tab``/``.txt``) or Parquet by suffix (``.gz`` allowed for text),
    as strings indexed by line (row for Parquet)."""
    path = Path(path)
    kind = table_kind(path)
    if kind in PARQUET:
        if not path.is_file():
            raise DataError("file not found", file=path)
        try:
            df = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise DataError(f"cannot read Parquet: {err}", file=path) from err
        if df.empty:
            raise DataError("file has no data rows", file=path)
        df.index = np.arange(len(df)) + 1
        return df
    if kind not in (".csv", ".tsv", ".tab", ".txt"):
        raise DataError(
            f"unknown table type {kind!r}; expected .csv, .tsv, .tab, .txt or .parquet", file=path
        )
    return read_delimited(path, sep="," if kind == ".csv" else "\t", quoting=csv.QUOTE_MINIMAL)


def csv_interactions(df: pd.DataFrame, path: Path, columns: ColumnMap) -> pd.DataFrame:
    """Rows of an interaction table -> interactions, plus ``text`` when ``columns.text`` names one."""
    frame = interaction_frame(
        df, path, user=columns.user, item=columns.item, rating=columns.rating, timestamp=columns.timestamp
    )
    if columns.text is not None:
        require_columns(df, [columns.text], path)
        frame["text"] = df[columns.text].astype(str)
    return frame


def read_csv_source(
    path: str | Path,
    columns: ColumnMap = ColumnMap(),
    *,
    item_meta: str | Path | None = None,
    user_meta: str | Path | None = None,
    interactions: bool = True,
) -> SourceTables:
    """An interaction table plus optional item/user metadata tables, keyed by the same id column
    names as the interactions; every other metadata column becomes an attribute in the text.
    Without ``interactions`` the interaction table is left unread (the out-of-core build reads it in
    pieces)."""
    path = Path(path)
    tables = SourceTables(interactions=NOT_READ, interactions_file=path, files=[path])
    if interactions:
        frame = csv_interactions(read_frame(path), path, columns)
        tables.interactions = frame.drop(columns="text", errors="ignore")
        if columns.text is not None:
            tables.reviews = frame[["user", "item", "timestamp", "text"]]
    if item_meta is not None:
        item_path = Path(item_meta)
        tables.add_items(
            metadata_frame(
                read_frame(item_path), item_path, id_column=columns.item, key="item", list_fields=set()
            ),
            item_path,
        )
    if user_meta is not None:
        user_path = Path(user_meta)
        tables.add_users(
            metadata_frame(
                read_frame(user_path),
                user_path,
                id_column=columns.user,
                key="user",
                list_fields=set(),
                skip=SKIP_USER_FIELDS,
            ),
            user_path,
        )
    return tables
