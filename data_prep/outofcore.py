"""Out-of-core filtering and indexing on DuckDB, for logs larger than memory (``--engine duckdb``).

The log is parsed a piece at a time by the readers' own parsers and checks (:mod:`data_prep.chunks`, so
malformed data gets the same one-line errors as in memory) into a DuckDB table on disk; the rating threshold,
duplicate collapse, k-core filter and the (user, time, item) sort run there as SQL, and the sorted
rows come back in chunks of whole users for the shared second half (:mod:`data_prep.assemble`).
Python holds only the id maps, per-user counts and one chunk at a time.

Why DuckDB rather than Polars' streaming engine: every operator needed here (a window function for
"latest duplicate wins", the iterative k-core's group-bys, joins, a full sort) runs under a fixed
``memory_limit`` and spills to a temporary directory, with the semantics spelled out in SQL; Polars'
streaming engine transparently falls back to its in-memory engine for operations it has no streaming
implementation of yet (pola-rs/polars#20947), so whether a plan fits in memory would depend on the
Polars version, which is exactly the case this engine exists for. DuckDB is one dependency-free wheel
and reads and writes Arrow without copies.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from data_prep import chunks as chunked
from data_prep.assemble import IndexedLog
from data_prep.errors import DataError
from data_prep.process import sorted_ids

if TYPE_CHECKING:
    from data_prep.build import BuildConfig
    from data_prep.readers import ColumnMap

logger = logging.getLogger(__name__)


def run(con, statement: str) -> list[tuple]:
    """Execute and fetch to the end (DuckDB refuses the next statement while a result is unfinished)."""
    return con.execute(statement).fetchall()


class OutOfCore:
    """A DuckDB database in a temporary directory (removed on exit) holding one build's log."""

    def __init__(self, config: BuildConfig, columns: ColumnMap):
        self.config, self.columns = config, columns
        self.known_users: set[str] = set()
        self.known_items: set[str] = set()
        self._reviews = False
        self._float_time = False

    def __enter__(self) -> OutOfCore:
        import duckdb  # here: only out-of-core builds pay for importing it

        self.directory = Path(tempfile.mkdtemp(prefix="data_prep-duckdb-"))
        self.con = duckdb.connect(str(self.directory / "log.duckdb"))
        run(self.con, f"SET memory_limit = '{self.config.memory_limit}'")
        run(self.con, f"SET temp_directory = '{self.directory / 'spill'}'")
        run(self.con, "SET preserve_insertion_order = false")
        if self.config.threads:
            run(self.con, f"SET threads = {int(self.config.threads)}")
        return self

    def __exit__(self, *exc) -> None:
        self.con.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _load(self, pieces: Iterable[pd.DataFrame]) -> int:
        """Raw rows (line, user, item, rating, timestamp[, text]) into the table ``raw``."""
        rows = 0
        self._float_time = False
        for piece in pieces:
            columns = {  # from_pandas keeps pandas' Arrow-backed strings as they are (no Python objects)
                "line": piece.index.to_numpy(dtype=np.int64),
                "user": pa.Array.from_pandas(piece["user"]).cast(pa.string()),
                "item": pa.Array.from_pandas(piece["item"]).cast(pa.string()),
                "rating": piece["rating"].to_numpy(dtype=np.float64),
                "timestamp": piece["timestamp"].to_numpy(),
            }
            if "text" in piece:  # a review text counts only when it is not blank (as in memory)
                text = piece["text"]
                blank = (text.str.strip() == "").to_numpy()
                columns["text"] = pa.array(text.to_numpy(dtype=object), pa.string(), mask=blank)
                self._reviews = True
            self.con.register("piece", pa.table(columns))
            if not rows:
                run(self.con, "CREATE TABLE raw AS SELECT * FROM piece")
            else:
                if not self._float_time and piece["timestamp"].dtype.kind == "f":
                    run(self.con, 'ALTER TABLE raw ALTER "timestamp" TYPE DOUBLE')
                run(self.con, "INSERT INTO raw BY NAME SELECT * FROM piece")
            self.con.unregister("piece")
            self._float_time |= piece["timestamp"].dtype.kind == "f"
            rows += len(piece)
        return rows

    def _count(self, query: str) -> int:
        return int(run(self.con, query)[0][0])

    def _column(self, query: str) -> np.ndarray:
        return self.con.sql(query).to_arrow_table().column(0).to_numpy(zero_copy_only=False)

    def _register_ids(self, con, user_ids: list[str], item_ids: list[str]) -> None:
        """Tables ``user_map`` and ``item_map`` (raw id -> code) on a connection."""
        con.register("user_map", pa.table({"raw": user_ids, "code": np.arange(len(user_ids))}))
        con.register("item_map", pa.table({"raw": item_ids, "code": np.arange(len(item_ids))}))

    def index(self) -> IndexedLog:
        """Read, filter, index; the returned log streams its chunks out of DuckDB."""
        config, con = self.config, self.con
        pieces = chunked.interaction_chunks(
            config.format, config.input, self.columns, config.item_meta, use_threads=config.threads != 1
        )
        rows = self._load(pieces)
        logger.info("read %d interactions from %s into DuckDB", rows, config.input)
        self.known_users = set(self._column('SELECT DISTINCT "user" FROM raw').tolist())
        self.known_items = set(self._column('SELECT DISTINCT "item" FROM raw').tolist())
        threshold = "TRUE"
        if config.rating_threshold is None:
            negative = self._count("SELECT count(*) FROM raw WHERE rating <= 0")
            if negative:
                logger.warning(
                    "%s: %d interactions have a rating <= 0 and still count as positive (every row is one "
                    "interaction); drop them with --rating_threshold",
                    config.input,
                    negative,
                )
        else:
            threshold = f"rating >= {float(config.rating_threshold)!r}"
        user_ids = sorted_ids(self._column(f'SELECT DISTINCT "user" FROM raw WHERE {threshold}'))
        item_ids = sorted_ids(self._column(f'SELECT DISTINCT "item" FROM raw WHERE {threshold}'))
        self._register_ids(con, user_ids, item_ids)
        # ids coded and, in the same statement (no coded copy of the log is stored), the latest row of a
        # repeated (user, item) pair kept: by timestamp, then by place in the file
        run(
            con,
            'CREATE TABLE log AS SELECT u.code AS "user", i.code AS "item", r.rating, r."timestamp" '
            'FROM raw r JOIN user_map u ON r."user" = u.raw JOIN item_map i ON r."item" = i.raw '
            f"WHERE {threshold} QUALIFY row_number() "
            'OVER (PARTITION BY u.code, i.code ORDER BY r."timestamp" DESC, r.line DESC) = 1',
        )
        coded = self._count(f"SELECT count(*) FROM raw WHERE {threshold}")  # every such row has its ids coded
        filters = {
            "rating_threshold": config.rating_threshold,
            "k_core": config.k_core,
            "duplicates_removed": coded - self._count("SELECT count(*) FROM log"),
        }
        k = int(config.k_core)
        while k > 1 and self._count(
            f'DELETE FROM log WHERE "user" IN (SELECT "user" FROM log GROUP BY "user" HAVING count(*) < {k}) '
            f'OR "item" IN (SELECT "item" FROM log GROUP BY "item" HAVING count(*) < {k})'
        ):
            pass
        counts = con.sql('SELECT "user", count(*) AS n FROM log GROUP BY "user" ORDER BY "user"').fetchnumpy()
        if not len(counts["user"]):
            raise DataError(f"no interactions left after filtering ({filters})", file=config.input)
        used_users = np.asarray(counts["user"], dtype=np.int64)
        used_items = self._column('SELECT DISTINCT "item" FROM log ORDER BY "item"').astype(np.int64)
        user_remap = np.full(len(user_ids), -1, dtype=np.int64)
        user_remap[used_users] = np.arange(len(used_users))
        item_remap = np.full(len(item_ids), -1, dtype=np.int64)
        item_remap[used_items] = np.arange(len(used_items))
        user_ids = [user_ids[j] for j in used_users]
        item_ids = [item_ids[j] for j in used_items]
        logger.info(
            "filtered and indexed in DuckDB: %d interactions of %d users and %d items",
            int(counts["n"].sum()),
            len(user_ids),
            len(item_ids),
        )
        log = IndexedLog(
            user_ids,
            item_ids,
            np.asarray(counts["n"], dtype=np.int64),
            lambda: self._chunks(user_remap, item_remap),
            filters,
        )
        if self._reviews:
            log.reviews = _DuckReviews(self, user_ids, item_ids)
        return log

    def _chunks(self, user_remap: np.ndarray, item_remap: np.ndarray) -> Iterator[pd.DataFrame]:
        """The log by (user, timestamp, item) in chunks of about ``chunk_rows`` rows of whole users (on a
        cursor of its own: the reviews write to the database meanwhile)."""
        reader = (
            self.con.cursor()
            .sql('SELECT "user", "item", rating, "timestamp" FROM log ORDER BY "user", "timestamp", "item"')
            .to_arrow_reader(self.config.chunk_rows)
        )
        carry = None
        for batch in reader:
            df = batch.to_pandas()
            df["user"] = user_remap[df["user"].to_numpy()]
            df["item"] = item_remap[df["item"].to_numpy()]
            if carry is not None:
                df = pd.concat([carry, df], ignore_index=True)
            users = df["user"].to_numpy()
            last = int(np.searchsorted(users, users[-1]))  # the last user may go on in the next batch
            carry = df.iloc[last:]
            if last:
                yield df.iloc[:last].reset_index(drop=True)
        if carry is not None and len(carry):
            yield carry.reset_index(drop=True)


class _DuckReviews:
    """:class:`data_prep.assemble.Reviews` of the ``raw`` table's review texts."""

    def __init__(self, source: OutOfCore, user_ids: list[str], item_ids: list[str]):
        self.source, self.user_ids, self.item_ids = source, user_ids, item_ids
        self.con = source.con.cursor()
        run(self.con, 'CREATE TABLE train_pairs ("user" BIGINT, "item" BIGINT)')

    def add_train(self, train: pd.DataFrame) -> None:
        self.con.register(
            "pairs", pa.table({"user": train["user"].to_numpy(), "item": train["item"].to_numpy()})
        )
        run(self.con, "INSERT INTO train_pairs SELECT * FROM pairs")
        self.con.unregister("pairs")

    def chunks(self) -> Iterator[pd.DataFrame]:
        self.source._register_ids(self.con, self.user_ids, self.item_ids)
        reader = self.con.sql(
            'SELECT u.code AS "user", i.code AS "item", r.text FROM raw r '
            'JOIN user_map u ON r."user" = u.raw JOIN item_map i ON r."item" = i.raw '
            'JOIN (SELECT DISTINCT "user", "item" FROM train_pairs) t ON t."user" = u.code AND t."item" = i.code '
            "WHERE r.text IS NOT NULL ORDER BY u.code, i.code, r.line"
        ).to_arrow_reader(self.source.config.chunk_rows)
        for batch in reader:
            yield batch.to_pandas()
