"""The dataset bundle on disk: writing its files and :func:`load_bundle` (see docs/architecture.md)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import scipy.sparse as sp
from datasets import Dataset, DatasetInfo, load_from_disk

from common.artifacts import Kind, recover
from common.catalogue import Catalogue
from common.io import ArtifactError, file_records, sha256_file, verify_files, write_json
from data_prep.corpora import CORPORA, FEATURES
from data_prep.errors import DataError
from data_prep.splits import SPLITS, user_histories
from data_prep.templates import Templates

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUNDLE = Kind("dataset bundle", MANIFEST)
logger = logging.getLogger(__name__)


TSV_OPTIONS = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
SPLIT_COLUMNS = ["user", "item", "rating", "timestamp"]
CORPUS_BATCH_ROWS = 10_000
CORPUS_SHARD_BYTES = 500 * 2**20  # datasets' default max_shard_size


class CorpusWriter:
    """One corpus written as it comes, in the on-disk layout of ``Dataset.save_to_disk`` (so
    ``load_from_disk`` reads it): Arrow stream shards of fixed ``CORPUS_BATCH_ROWS``-row record batches,
    a new shard past ``CORPUS_SHARD_BYTES``, ``dataset_info.json`` and ``state.json``.

    Not ``save_to_disk`` itself: that needs the whole corpus in memory, and its ``state.json`` holds a
    random fingerprint, so two builds of the same data differed. Here the bytes depend only on the rows
    (the fingerprint is their sha256), however the rows were cut into pieces: the in-memory and
    out-of-core builds write identical files.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True)
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._shards: list[Path] = []
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._shard_bytes = 0

    def write(self, rows: Dataset | pa.Table) -> None:
        """Append rows (a corpus Dataset or an Arrow table of its features)."""
        table = rows.data.table if isinstance(rows, Dataset) else rows
        if not len(table):
            return
        self._pending.append(table.cast(FEATURES.arrow_schema))
        self._pending_rows += len(table)
        if self._pending_rows >= CORPUS_BATCH_ROWS:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._pending).combine_chunks()
        full = len(table) if final else len(table) - len(table) % CORPUS_BATCH_ROWS
        for start in range(0, full, CORPUS_BATCH_ROWS):
            # take() copies into fresh buffers: Arrow serialises a slice of a larger array differently
            self._write_batch(table.take(np.arange(start, min(start + CORPUS_BATCH_ROWS, full))))
        rest = table.slice(full)
        self._pending, self._pending_rows = ([rest], len(rest)) if len(rest) else ([], 0)

    def _write_batch(self, batch: pa.Table) -> None:
        if self._writer is None:
            self._shards.append(self.directory / f"shard-{len(self._shards)}.arrow")
            self._writer = pa.ipc.new_stream(str(self._shards[-1]), FEATURES.arrow_schema)
            self._shard_bytes = 0
        self._writer.write_table(batch)
        self.rows += len(batch)
        self._shard_bytes += batch.nbytes
        if self._shard_bytes >= CORPUS_SHARD_BYTES:
            self._writer.close()
            self._writer = None

    def close(self) -> int:
        """Finish the shards and the metadata files; returns the number of rows."""
        if self._pending:
            self._flush(final=True)
        if self._writer is None and not self._shards:  # an empty corpus still gets one (empty) shard
            self._shards.append(self.directory / "shard-0.arrow")
            self._writer = pa.ipc.new_stream(str(self._shards[-1]), FEATURES.arrow_schema)
        if self._writer is not None:
            self._writer.close()
        names = [f"data-{i:05d}-of-{len(self._shards):05d}.arrow" for i in range(len(self._shards))]
        for shard, name in zip(self._shards, names, strict=True):
            shard.rename(self.directory / name)
        digest = hashlib.sha256("".join(sha256_file(self.directory / n) for n in names).encode())
        state = {
            "_data_files": [{"filename": name} for name in names],
            "_fingerprint": digest.hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        write_json(self.directory / "state.json", state)
        DatasetInfo(features=FEATURES).write_to_directory(str(self.directory))
        return self.rows


class BundleWriter:
    """Writes a bundle piece by piece: split rows and corpus rows are appended in chunks (whole users at
    a time, in index order), so a build never needs all of them in memory at once."""

    def __init__(self, directory: Path):
        self.directory = directory
        (directory / "splits").mkdir()
        self.split_rows = dict.fromkeys(SPLITS, 0)
        self._splits = {}
        for name in SPLITS:
            self._splits[name] = open(directory / "splits" / f"{name}.tsv", "wb")  # noqa: SIM115 (closed in finish)
            self._splits[name].write(("\t".join(SPLIT_COLUMNS) + "\n").encode())
        self._corpora = {name: CorpusWriter(directory / "corpora" / name) for name in CORPORA}

    def append_splits(self, splits: dict[str, pd.DataFrame]) -> None:
        """Rows of each split (numbers only, so no quoting; pyarrow's writer is ~5x faster than
        ``to_csv`` at 1M rows)."""
        for name, part in splits.items():
            if len(part):
                table = pa.Table.from_pandas(part[SPLIT_COLUMNS], preserve_index=False)
                pacsv.write_csv(table, self._splits[name], TSV_OPTIONS)
                self.split_rows[name] += len(part)

    def append_corpus(self, name: str, rows: Dataset | pa.Table) -> None:
        self._corpora[name].write(rows)

    def write_ids(
        self,
        user_ids: list[str],
        user_text: list[str],
        item_ids: list[str],
        item_titles: list[str],
        item_text: list[str],
    ) -> None:
        """``users.tsv`` and ``items.tsv``: index, raw id and text (items: and title)."""
        pd.DataFrame({"index": np.arange(len(user_ids)), "raw_id": user_ids, "text": user_text}).to_csv(
            self.directory / "users.tsv", sep="\t", index=False
        )
        pd.DataFrame(
            {"index": np.arange(len(item_ids)), "raw_id": item_ids, "title": item_titles, "text": item_text}
        ).to_csv(self.directory / "items.tsv", sep="\t", index=False)

    def close(self) -> dict[str, int]:
        """Close every file; returns the row counts of the splits and ``corpus_<name>`` of the corpora."""
        for handle in self._splits.values():
            handle.close()
        corpora = {f"corpus_{name}": writer.close() for name, writer in self._corpora.items()}
        return {**self.split_rows, **corpora}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """The manifest, with the size and sha256 of every other file (written last)."""
        write_json(
            self.directory / MANIFEST, {**manifest, "files": file_records(self.directory, exclude=MANIFEST)}
        )


def _read_tsv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(
            "bundle file missing (was the bundle built by `python -m data_prep build`?)", file=path
        )
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)


class Bundle:
    """Read access to a dataset bundle: id maps, texts, splits and corpora (loaded lazily).

    With ``verify`` (the default) every file is checked against the manifest's sizes and sha256s
    first (about a second per GB); either way, the row counts of what is read must match the
    manifest's counts.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        recover(self.path)  # a build killed while renaming leaves the old or new bundle beside it
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise DataError("not a dataset bundle: manifest.json missing", file=self.path)
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"not valid JSON ({err}); rebuild the bundle", file=manifest_path) from err
        if not isinstance(self.manifest, dict):
            raise DataError("expected a JSON object; rebuild the bundle", file=manifest_path)
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"unsupported bundle format_version {version!r} (expected {FORMAT_VERSION})",
                file=manifest_path,
            )
        if verify and "files" in self.manifest:
            try:
                verify_files(self.path, self.manifest["files"], manifest_path)
            except ArtifactError as err:
                raise DataError(f"{err.reason}; rebuild the bundle", file=err.file) from err
        users = self._check_count(_read_tsv(self.path / "users.tsv"), "users", self.path / "users.tsv")
        items = self._check_count(_read_tsv(self.path / "items.tsv"), "items", self.path / "items.tsv")
        self.catalogue = Catalogue(
            users["raw_id"].tolist(), items["raw_id"].tolist(), items["title"].tolist()
        )
        self.user_ids, self.item_ids = self.catalogue.user_ids, self.catalogue.item_ids
        self.item_titles = self.catalogue.item_titles
        self.n_users, self.n_items = self.catalogue.n_users, self.catalogue.n_items
        self.user_index, self.item_index = self.catalogue.user_index, self.catalogue.item_index
        self.user_text: list[str] = users["text"].tolist()
        self.item_text: list[str] = items["text"].tolist()
        self.templates = Templates.from_dict(self.manifest.get("templates", {}), source=str(manifest_path))
        self._interactions: dict[str, pd.DataFrame] = {}
        self._histories: dict[str, list[list[int]]] = {}
        self._corpora: dict[str, Dataset] = {}

    def interactions(self, split: str) -> pd.DataFrame:
        """``user, item, rating, timestamp`` rows of one split (contiguous int indices)."""
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._interactions:
            path = self.path / "splits" / f"{split}.tsv"
            if not path.is_file():
                raise DataError("bundle file missing", file=path)
            try:
                df = pd.read_csv(
                    path, sep="\t", dtype={"user": np.int64, "item": np.int64, "rating": np.float64}
                )
            except (ValueError, pd.errors.ParserError) as err:
                raise DataError(f"not a bundle split file ({err}); rebuild the bundle", file=path) from err
            df = self._check_count(df, split, path)
            for column, size in (("user", self.n_users), ("item", self.n_items)):
                outside = (df[column] < 0) | (df[column] >= size)
                if outside.any():
                    raise DataError(
                        f"{column} index {df[column][outside].iloc[0]} outside 0..{size - 1}; rebuild the bundle",
                        file=path,
                        line=int(np.argmax(outside.to_numpy())) + 2,
                        field=column,
                    )
            self._interactions[split] = df
        return self._interactions[split]

    def matrix(self, split: str) -> sp.csr_matrix:
        """Binary (n_users, n_items) float32 CSR matrix of a split."""
        df = self.interactions(split)
        data = np.ones(len(df), dtype=np.float32)
        m = sp.csr_matrix(
            (data, (df["user"].to_numpy(), df["item"].to_numpy())), shape=(self.n_users, self.n_items)
        )
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    def histories(self, split: str = "train") -> list[list[int]]:
        """Every user's items in ``split`` (index by user), oldest first; ties keep the file's order."""
        if split not in self._histories:
            self._histories[split] = user_histories(self.interactions(split), self.n_users)
        return self._histories[split]

    def seen(self, split: str) -> sp.csr_matrix:
        """What a ranking on ``split`` excludes: the training items, plus the validation items for test."""
        if split not in ("valid", "test"):
            raise KeyError(f"rankings are made for 'valid' or 'test', not {split!r}")
        seen = self.matrix("train")
        return seen + self.matrix("valid") if split == "test" else seen

    def corpus(self, name: str) -> Dataset:
        """One of ``collaborative``, ``content``, ``finetune`` as a ``datasets.Dataset``."""
        if name not in CORPORA:
            raise KeyError(f"unknown corpus {name!r}; expected one of {CORPORA}")
        if name not in self._corpora:
            directory = self.path / "corpora" / name
            try:
                corpus = load_from_disk(str(directory))
            except (OSError, ValueError, IndexError, pa.ArrowException) as err:
                if _no_shards(directory):  # written by data_prep before empty corpora got a shard
                    corpus = Dataset(FEATURES.arrow_schema.empty_table())
                else:
                    raise DataError(
                        f"cannot read the corpus ({err}); rebuild the bundle", file=directory
                    ) from err
            self._corpora[name] = self._check_count(corpus, f"corpus_{name}", directory)
        return self._corpora[name]

    def _check_count(self, table, key: str, path: Path):
        """``table`` when its length is the manifest's ``counts[key]`` (or there is none to compare)."""
        expected = self.manifest.get("counts", {}).get(key)
        if expected is not None and len(table) != expected:
            raise DataError(
                f"{len(table)} rows, but manifest.json counts {expected} {key}: the bundle was edited or "
                "damaged; rebuild it",
                file=path,
            )
        return table

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, n_users={self.n_users}, n_items={self.n_items})"


def _no_shards(directory: Path) -> bool:
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return state.get("_data_files") == []


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle written by ``python -m data_prep build``; ``verify=False`` skips the sha256 check."""
    return Bundle(path, verify=verify)
