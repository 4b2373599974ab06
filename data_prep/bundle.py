"""The dataset bundle on disk: atomic writing and :func:`load_bundle` (see docs/architecture.md)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import scipy.sparse as sp
from datasets import Dataset, load_from_disk

from data_prep.corpora import CORPORA
from data_prep.errors import DataError
from data_prep.splits import SPLITS
from data_prep.templates import Templates

FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` and rename it to ``out`` only if the block succeeds,
    so a failed build never leaves a half-written bundle (or clobbers a good one)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError("output directory already exists (use --overwrite to replace it)", file=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        corpora[name].save_to_disk(str(directory / "corpora" / name))
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _read_tsv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(
            "bundle file missing (was the bundle built by `python -m data_prep build`?)", file=path
        )
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)


class Bundle:
    """Read access to a dataset bundle: id maps, texts, splits and corpora (loaded lazily)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise DataError("not a dataset bundle: manifest.json missing", file=self.path)
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"unsupported bundle format_version {version!r} (expected {FORMAT_VERSION})",
                file=manifest_path,
            )
        users = _read_tsv(self.path / "users.tsv")
        items = _read_tsv(self.path / "items.tsv")
        self.user_ids: list[str] = users["raw_id"].tolist()
        self.user_text: list[str] = users["text"].tolist()
        self.item_ids: list[str] = items["raw_id"].tolist()
        self.item_titles: list[str] = items["title"].tolist()
        self.item_text: list[str] = items["text"].tolist()
        self.user_index: dict[str, int] = {raw: i for i, raw in enumerate(self.user_ids)}
        self.item_index: dict[str, int] = {raw: i for i, raw in enumerate(self.item_ids)}
        self.templates = Templates.from_dict(self.manifest.get("templates", {}), source=str(manifest_path))
        self._interactions: dict[str, pd.DataFrame] = {}
        self._corpora: dict[str, Dataset] = {}

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def interactions(self, split: str) -> pd.DataFrame:
        """``user, item, rating, timestamp`` rows of one split (contiguous int indices)."""
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._interactions:
            path = self.path / "splits" / f"{split}.tsv"
            if not path.is_file():
                raise DataError("bundle file missing", file=path)
            df = pd.read_csv(path, sep="\t", dtype={"user": np.int64, "item": np.int64, "rating": np.float64})
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

    def corpus(self, name: str) -> Dataset:
        """One of ``collaborative``, ``content``, ``finetune`` as a ``datasets.Dataset``."""
        if name not in CORPORA:
            raise KeyError(f"unknown corpus {name!r}; expected one of {CORPORA}")
        if name not in self._corpora:
            self._corpora[name] = load_from_disk(str(self.path / "corpora" / name))
        return self._corpora[name]

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, n_users={self.n_users}, n_items={self.n_items})"


def load_bundle(path: str | Path) -> Bundle:
    """Open a bundle written by ``python -m data_prep build``."""
    return Bundle(path)
