"""The dataset bundle on disk: writing its files and :func:`load_bundle` (see docs/architecture.md)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import scipy.sparse as sp
from datasets import Dataset, load_from_disk

from common.artifacts import Kind, recover
from common.catalogue import Catalogue
from common.io import ArtifactError, file_records, verify_files, write_json
from data_prep.corpora import CORPORA, FEATURES
from data_prep.errors import DataError
from data_prep.splits import SPLITS, user_histories
from data_prep.templates import Templates

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUNDLE = Kind("dataset bundle", MANIFEST)
logger = logging.getLogger(__name__)


def _write_numeric_tsv(df: pd.DataFrame, path: Path) -> None:
    """Numbers only, so no quoting is needed; pyarrow's writer is ~5x faster than ``to_csv`` at 1M rows."""
    with open(path, "wb") as fh:
        fh.write(("\t".join(df.columns) + "\n").encode())
        options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
        pacsv.write_csv(pa.Table.from_pandas(df, preserve_index=False), fh, options)


def write_tables(
    directory: Path,
    *,
    manifest: dict[str, Any],
    user_ids: list[str],
    user_text: list[str],
    item_ids: list[str],
    item_titles: list[str],
    item_text: list[str],
    splits: dict[str, pd.DataFrame],
    corpora: dict[str, Dataset],
) -> None:
    """Write every file of the bundle layout into ``directory``."""
    pd.DataFrame({"index": np.arange(len(user_ids)), "raw_id": user_ids, "text": user_text}).to_csv(
        directory / "users.tsv", sep="\t", index=False
    )
    pd.DataFrame(
        {"index": np.arange(len(item_ids)), "raw_id": item_ids, "title": item_titles, "text": item_text}
    ).to_csv(directory / "items.tsv", sep="\t", index=False)
    (directory / "splits").mkdir()
    for name in SPLITS:
        _write_numeric_tsv(
            splits[name][["user", "item", "rating", "timestamp"]], directory / "splits" / f"{name}.tsv"
        )
    for name in CORPORA:
        # an empty corpus (no item text) still needs one shard, or load_from_disk cannot read it back
        corpora[name].save_to_disk(
            str(directory / "corpora" / name), num_shards=1 if not len(corpora[name]) else None
        )
    manifest = {**manifest, "files": file_records(directory, exclude=MANIFEST)}
    write_json(directory / MANIFEST, manifest)


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
