"""``python -m data_prep build``: source files -> validated tables -> filters -> splits -> corpora -> bundle."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml

from common import __version__
from common.artifacts import write_directory
from common.io import ArtifactError, sha256_file
from data_prep import readers
from data_prep.assemble import IndexedLog, splitter, write_content, write_rows
from data_prep.bundle import BUNDLE, FORMAT_VERSION, MANIFEST, BundleWriter
from data_prep.chunks import interactions_file
from data_prep.cold import ColdUserSplitter, cold_ids
from data_prep.errors import DataError
from data_prep.outofcore import OutOfCore
from data_prep.process import (
    align_metadata,
    apply_threshold,
    compact,
    drop_duplicates,
    encode,
    k_core,
    sorted_ids,
)
from data_prep.splits import SPLITS, sort_rows
from data_prep.templates import Templates
from data_prep.text import item_text, user_text

logger = logging.getLogger(__name__)

FORMATS = ("recbole", "movielens", "amazon", "csv")


@dataclass
class BuildConfig:
    """Everything ``build`` needs; the CLI parses it with ``common.config`` (``--config`` YAML works too)."""

    input: str = field(metadata={"help": "source directory or file"})
    out: str = field(metadata={"help": "bundle directory to create"})
    format: Literal["recbole", "movielens", "amazon", "csv"] = field(
        default="recbole", metadata={"help": "source format"}
    )
    split: Literal["random", "temporal", "loo", "presplit", "cold-items", "cold-users"] = field(
        default="random",
        metadata={
            "help": "per-user random/temporal ratios, leave-one-out, a fixed split, or a cold-start split "
            "(cold-items / cold-users: a --cold_ratio share held out of training, see data_prep.cold)"
        },
    )
    presplit: str | None = field(
        default=None, metadata={"help": "directory of train/valid/test.tsv (--split presplit)"}
    )
    ratios: list[float] = field(
        default_factory=lambda: [0.8, 0.1, 0.1], metadata={"help": "train valid test"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random split and the finetune masks"})
    cold_ratio: float = field(
        default=0.1, metadata={"help": "share of items (cold-items) or users (cold-users) held out"}
    )
    rating_threshold: float | None = field(
        default=None,
        metadata={
            "help": "keep interactions rated at least this; unset, every row counts as one positive "
            "interaction, whatever its rating (negative ones included)"
        },
    )
    k_core: int = field(default=0, metadata={"help": "iterative k-core filter on users and items (0: off)"})
    item_meta: str | None = field(default=None, metadata={"help": "item metadata file (amazon, csv)"})
    user_meta: str | None = field(default=None, metadata={"help": "user metadata file (csv)"})
    user_col: str = field(default="user_id", metadata={"help": "csv: user column"})
    item_col: str = field(default="item_id", metadata={"help": "csv: item column"})
    rating_col: str | None = field(
        default=None, metadata={"help": "csv: rating column (default: implicit 1.0)"}
    )
    time_col: str | None = field(
        default=None, metadata={"help": "csv: timestamp column (default: row order)"}
    )
    text_col: str | None = field(default=None, metadata={"help": "csv: review text column"})
    templates: str | None = field(
        default=None, metadata={"help": "JSON/YAML file overriding prompt templates"}
    )
    finetune_keep: float = field(
        default=0.8, metadata={"help": "share of training items shown in finetune prompts"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing bundle directory"})
    engine: Literal["auto", "memory", "duckdb"] = field(
        default="auto",
        metadata={
            "help": "memory: pandas, the whole log in RAM; duckdb: out of core, for logs larger than memory "
            "(same bundle, byte for byte); auto: duckdb when the interaction file exceeds --auto_bytes"
        },
    )
    auto_bytes: int = field(
        default=500 * 2**20,
        metadata={"help": "--engine auto: interaction files larger than this build out of core"},
    )
    memory_limit: str = field(
        default="4GB",
        metadata={"help": "--engine duckdb: DuckDB's memory limit; beyond it, it spills to disk"},
    )
    chunk_rows: int = field(
        default=2_000_000,
        metadata={"help": "--engine duckdb: rows read, split and written per chunk (whole users per chunk)"},
    )
    threads: int = field(
        default=0,
        metadata={
            "help": "--engine duckdb: DuckDB's worker threads (0: DuckDB's default, one per CPU core; 1 also "
            "keeps Arrow's CSV parsing on one thread)"
        },
    )


# the options that name a source file or directory: the bundle may not be written over or around them
INPUTS = ("input", "presplit", "item_meta", "user_meta", "templates")


def read_source(config: BuildConfig, interactions: bool = True) -> readers.SourceTables:
    """Dispatch to the reader of ``config.format``; without ``interactions``, metadata only (the
    out-of-core engine reads the interactions in pieces)."""
    if config.format == "recbole":
        return readers.read_recbole(config.input, interactions=interactions)
    if config.format == "movielens":
        return readers.read_movielens(config.input, interactions=interactions)
    if config.format == "amazon":
        return readers.read_amazon(config.input, meta=config.item_meta, interactions=interactions)
    if config.format == "csv":
        return readers.read_csv_source(
            config.input,
            column_map(config),
            item_meta=config.item_meta,
            user_meta=config.user_meta,
            interactions=interactions,
        )
    raise DataError(f"unknown format {config.format!r}; expected one of {list(FORMATS)}", field="format")


def column_map(config: BuildConfig) -> readers.ColumnMap:
    """The ``csv`` format's column names."""
    return readers.ColumnMap(
        user=config.user_col,
        item=config.item_col,
        rating=config.rating_col,
        timestamp=config.time_col,
        text=config.text_col,
    )


def load_templates(path: str | None) -> Templates:
    """Defaults, or a JSON/YAML mapping of template name -> format string overriding some of them."""
    if path is None:
        return Templates()
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"cannot read templates: {err}", file=path) from err
    if not isinstance(values, dict):
        raise DataError("expected a mapping of template name: format string", file=path)
    return Templates.from_dict(values, source=path)


def _overlaps(parts: dict[str, pd.DataFrame], directory: Path) -> dict[str, int]:
    """Collapse repeated (user, item) rows inside each split to the latest (counts returned) and refuse a
    pair that sits in two splits: evaluation would then score items the model trained on."""
    removed = {}
    for name in SPLITS:
        part = parts[name]
        repeated = part.duplicated(["user", "item"], keep="last")
        removed[name] = int(repeated.sum())
        parts[name] = part[~repeated.to_numpy()]
        if removed[name]:
            logger.warning(
                "%s: collapsed %d repeated (user, item) rows", directory / f"{name}.tsv", removed[name]
            )
    for earlier, later in (("train", "valid"), ("train", "test"), ("valid", "test")):
        keys = pd.MultiIndex.from_frame(parts[earlier][["user", "item"]])
        shared = pd.MultiIndex.from_frame(parts[later][["user", "item"]]).isin(keys)
        if shared.any():
            line = int(parts[later].index[int(np.argmax(shared))])
            row = parts[later].loc[line]
            raise DataError(
                f"user {row['user']!r} and item {row['item']!r} are also in {earlier}.tsv "
                f"({int(shared.sum())} {later} rows overlap {earlier}); a pair may sit in one split only",
                file=directory / f"{later}.tsv",
                line=line,
                field="item_id",
            )
    return removed


def _warn_non_positive(df: pd.DataFrame, threshold: float | None, file: str | Path) -> None:
    """Every row is a positive interaction unless a threshold drops it: say so when ratings look negative."""
    if threshold is not None:
        return
    negative = int((df["rating"] <= 0).sum())
    if negative:
        logger.warning(
            "%s: %d interactions have a rating <= 0 and still count as positive (every row is one "
            "interaction); drop them with --rating_threshold",
            file,
            negative,
        )


def _warn_empty_held_out(rows: dict[str, int], per_user: np.ndarray, config: BuildConfig) -> None:
    """Say so when a split the protocol asks for comes out empty (users with too few interactions): such a
    bundle trains, but cannot validate or test. ``rows``: rows per split; ``per_user``: rows per user."""
    wanted = {"valid": config.ratios[1] > 0, "test": config.ratios[2] > 0}
    if config.split == "loo":
        wanted = {"valid": True, "test": True}
    empty = [name for name, asked in wanted.items() if asked and not rows[name]]
    if empty:
        per_user = per_user[per_user > 0]
        logger.warning(
            "%s: the %s split(s) came out empty: users have %d to %d interactions (median %g), too few "
            "for --split %s with ratios %s; use more data, other ratios or --split loo",
            config.input,
            " and ".join(empty),
            per_user.min(),
            per_user.max(),
            np.median(per_user),
            config.split,
            list(config.ratios),
        )


def _presplit(
    config: BuildConfig,
) -> tuple[dict[str, pd.DataFrame], list[str], list[str], list[Path], dict[str, int]]:
    """Fixed split: id maps over the union of the three files; valid/test users need training rows.
    Also returns how many repeated rows each split had collapsed."""
    if config.presplit is None:
        raise DataError("--split presplit needs --presplit DIR (train/valid/test.tsv)", field="presplit")
    if config.rating_threshold is not None or config.k_core > 1:
        raise DataError(
            "a fixed split cannot be filtered; drop --rating_threshold/--k_core", field="presplit"
        )
    parts = readers.read_presplit(config.presplit)
    removed = _overlaps(parts, Path(config.presplit))
    for name in SPLITS:
        _warn_non_positive(parts[name], None, Path(config.presplit) / f"{name}.tsv")
    train_users = set(parts["train"]["user"])
    for name in ("valid", "test"):
        orphan = ~parts[name]["user"].isin(train_users)
        if orphan.any():
            line = int(parts[name].index[int(np.argmax(orphan.to_numpy()))])
            raise DataError(
                f"user {parts[name]['user'].loc[line]!r} has no training interaction "
                f"({int(orphan.sum())} such rows)",
                file=Path(config.presplit) / f"{name}.tsv",
                line=line,
                field="user_id",
            )
    every = pd.concat(parts.values())
    user_ids, item_ids = sorted_ids(every["user"]), sorted_ids(every["item"])
    splits = {}
    for name, part in parts.items():
        coded = part.assign(user=encode(part["user"], user_ids), item=encode(part["item"], item_ids))
        splits[name] = sort_rows(coded)
    files = [Path(config.presplit) / f"{name}.tsv" for name in SPLITS]
    return splits, user_ids, item_ids, files, removed


def _index(config: BuildConfig, raw: pd.DataFrame) -> IndexedLog:
    """Filter (threshold, duplicates, k-core) and index in memory. Ids are encoded to integers first so
    that duplicate removal and k-core work on int columns, then renumbered contiguously."""
    _warn_non_positive(raw, config.rating_threshold, config.input)
    df = apply_threshold(raw, config.rating_threshold)
    user_ids, item_ids = sorted_ids(df["user"]), sorted_ids(df["item"])
    coded = pd.DataFrame(
        {
            "user": encode(df["user"], user_ids),
            "item": encode(df["item"], item_ids),
            "rating": df["rating"].to_numpy(),
            "timestamp": df["timestamp"].to_numpy(),
        }
    )
    deduped = drop_duplicates(coded)
    filters = {
        "rating_threshold": config.rating_threshold,
        "k_core": config.k_core,
        "duplicates_removed": len(coded) - len(deduped),
    }
    coded = k_core(deduped, config.k_core)
    if coded.empty:
        raise DataError(f"no interactions left after filtering ({filters})", file=config.input)
    coded, user_ids = compact(coded, "user", user_ids)
    coded, item_ids = compact(coded, "item", item_ids)
    coded = sort_rows(coded)
    counts = np.bincount(coded["user"].to_numpy(), minlength=len(user_ids))
    return IndexedLog(user_ids, item_ids, counts, lambda: iter([coded]), filters)


class _FrameReviews:
    """:class:`data_prep.assemble.Reviews` of a reader's in-memory review table."""

    def __init__(self, reviews: pd.DataFrame, user_ids: list[str], item_ids: list[str]):
        self.reviews, self.user_ids, self.item_ids = reviews, user_ids, item_ids
        self.train: list[pd.DataFrame] = []

    def add_train(self, train: pd.DataFrame) -> None:
        self.train.append(train[["user", "item"]])

    def chunks(self) -> Iterator[pd.DataFrame]:
        train = (
            pd.concat(self.train) if self.train else pd.DataFrame({"user": [], "item": []}, dtype=np.int64)
        )
        yield _reviews(self.reviews, train, self.user_ids, self.item_ids)


def _reviews(
    reviews: pd.DataFrame, train: pd.DataFrame, user_ids: list[str], item_ids: list[str]
) -> pd.DataFrame:
    """Reviews of training interactions only (a held-out review would leak its target)."""
    reviews = reviews[reviews["text"].str.strip() != ""]
    coded = pd.DataFrame(
        {
            "user": encode(reviews["user"], user_ids),
            "item": encode(reviews["item"], item_ids),
            "text": reviews["text"].to_numpy(),
        }
    )
    coded = coded.merge(train[["user", "item"]].drop_duplicates(), on=["user", "item"], how="inner")
    return coded.sort_values(["user", "item"], kind="stable").reset_index(drop=True)


def _blank(texts: list[str], indices: np.ndarray) -> list[str]:
    """``texts`` with the given entries emptied (an empty text gets no content document)."""
    out = list(texts)
    for i in indices:
        out[int(i)] = ""
    return out


def build(config: BuildConfig) -> Path:
    """Build the bundle at ``config.out`` and return its path; raises :class:`DataError` on bad input."""
    start = time.perf_counter()
    inputs = {f"--{name}": getattr(config, name) for name in INPUTS}
    try:
        with write_directory(config.out, BUNDLE, overwrite=config.overwrite, inputs=inputs) as tmp:
            counts = _build_into(config, tmp)
    except ArtifactError as err:
        raise DataError(err.reason, file=err.file) from err
    logger.info("wrote %s in %.1fs: %s", config.out, time.perf_counter() - start, json.dumps(counts))
    return Path(config.out)


def _build_into(config: BuildConfig, tmp: Path) -> dict[str, int]:
    """Every step of :func:`build`, writing into ``tmp``; returns the manifest's counts."""
    templates = load_templates(config.templates)
    if not 0 < config.finetune_keep <= 1:
        raise DataError(f"must be in (0, 1], got {config.finetune_keep}", field="finetune_keep")
    if config.threads < 0:
        raise DataError(f"must be 0 (DuckDB's default) or more, got {config.threads}", field="threads")
    if choose_engine(config) == "duckdb":
        tables = read_source(config, interactions=False)
        with OutOfCore(config, column_map(config)) as source:
            log = source.index()
            return _assemble(config, tmp, templates, tables, log, source.known_users, source.known_items)
    tables = read_source(config)
    logger.info("read %d interactions from %s", len(tables.interactions), tables.interactions_file)
    known_users = set(pd.unique(tables.interactions["user"]))
    known_items = set(pd.unique(tables.interactions["item"]))
    if config.split == "presplit":
        return _assemble(config, tmp, templates, tables, None, known_users, known_items)
    log = _index(config, tables.interactions)
    if tables.reviews is not None:
        log.reviews = _FrameReviews(tables.reviews, log.user_ids, log.item_ids)
    return _assemble(config, tmp, templates, tables, log, known_users, known_items)


def choose_engine(config: BuildConfig) -> str:
    """``memory`` or ``duckdb``: ``auto`` takes DuckDB when the interaction file is larger than
    ``--auto_bytes``. A fixed split (``presplit``) is always read in memory."""
    if config.split == "presplit" or config.engine == "memory":
        return "memory"
    if config.engine == "duckdb":
        return "duckdb"
    try:
        size = interactions_file(config.format, config.input, config.item_meta).stat().st_size
    except (OSError, DataError):
        return "memory"  # the reader then names what is missing
    return "duckdb" if size > config.auto_bytes else "memory"


def _assemble(
    config: BuildConfig,
    tmp: Path,
    templates: Templates,
    tables: readers.SourceTables,
    log: IndexedLog | None,
    known_users: set[str],
    known_items: set[str],
) -> dict[str, int]:
    """Split (or take the fixed split), write rows, texts, corpora and the manifest into ``tmp``."""
    files = list(tables.files)
    writer = BundleWriter(tmp)
    reviews = None
    if log is None:  # presplit
        splits, user_ids, item_ids, split_files, removed = _presplit(config)
        files += split_files
        filters = {
            "rating_threshold": None,
            "k_core": 0,
            "duplicates_removed": sum(removed.values()),
            "duplicates_removed_per_split": removed,
        }
        known_users |= set(user_ids)
        known_items |= set(item_ids)
        if tables.reviews is not None:
            reviews = _FrameReviews(tables.reviews, user_ids, item_ids)
        per_user = write_rows(
            writer, [splits], len(user_ids), templates, config.seed, config.finetune_keep, reviews=reviews
        )
        protocol = {"protocol": "presplit", "source": str(config.presplit), "seed": None}
    else:
        user_ids, item_ids, filters, reviews = log.user_ids, log.item_ids, log.filters, log.reviews
        ratios = tuple(config.ratios)
        split = splitter(config.split, log, ratios, config.seed, config.cold_ratio)
        untrained = split.users if isinstance(split, ColdUserSplitter) else None
        per_user = write_rows(
            writer,
            (split(chunk) for chunk in log.chunks()),
            len(user_ids),
            templates,
            config.seed,
            config.finetune_keep,
            untrained_users=None if untrained is None else np.concatenate(list(untrained.values())),
            reviews=reviews,
        )
        cold = split.finish()
        logger.info("split and wrote %d rows with their corpora", sum(writer.split_rows.values()))
        seeded = config.split in ("random", "cold-items", "cold-users")
        protocol = {"protocol": config.split, "seed": config.seed if seeded else None}
        if config.split != "loo":
            protocol["ratios"] = list(config.ratios)
        if cold:
            protocol["cold_ratio"] = config.cold_ratio
            kind = "items" if config.split == "cold-items" else "users"
            ids = user_ids if kind == "users" else item_ids
            protocol[f"cold_{kind}"] = {
                name: {"index": index, "raw_id": [ids[i] for i in index]} for name, index in cold.items()
            }
        _warn_empty_held_out(writer.split_rows, per_user, config)
    item_text_series = item_text(tables.items) if tables.items is not None else None
    user_text_series = user_text(tables.users) if tables.users is not None else None
    titles, items_text = align_metadata(
        tables.items,
        "item",
        item_ids,
        known_items,
        tables.items_file,
        item_text_series,
        tables.extra_metadata_ok,
    )
    _, users_text = align_metadata(
        tables.users,
        "user",
        user_ids,
        known_users,
        tables.users_file,
        user_text_series,
        tables.extra_metadata_ok,
    )
    writer.write_ids(user_ids, users_text, item_ids, titles, items_text)
    # new items and users are unknown at training time: none of their text goes into the corpora
    write_content(
        writer,
        templates,
        _blank(items_text, cold_ids({"split": protocol}, "items")),
        _blank(users_text, cold_ids({"split": protocol}, "users")),
        reviews,
    )
    counts = writer.close()
    if not counts["corpus_content"]:
        logger.warning("no item text, user text or reviews: the content corpus is empty (training skips it)")
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": {
            "format": config.format,
            "input": str(config.input),
            "files": {str(p): sha256_file(p) for p in files},
        },
        "counts": {"users": len(user_ids), "items": len(item_ids), **counts},
        "split": protocol,
        "filters": filters,
        "finetune_keep": config.finetune_keep,
        "templates": templates.to_dict(),
        "data_prep_version": __version__,
    }
    writer.write_manifest(manifest)
    return manifest["counts"]


def build_ml100k_reference(
    shared: str | Path, out: str | Path, split: str = "ml-100k-random", exist_ok: bool = False
) -> Path:
    """MovieLens-100K on a fixed split in ``shared`` (``../shared`` beside a checkout): the per-user
    random split (the default) or ``"ml-100k-loo"``, the next-item leave-one-out one; the bundles that
    the project's tests and quality numbers use. With ``exist_ok`` a bundle already at ``out`` is kept
    (benchmarks build it once)."""
    if exist_ok and (Path(out) / MANIFEST).is_file():
        return Path(out)
    shared = Path(shared)
    return build(
        BuildConfig(
            format="recbole",
            input=str(shared / "datasets" / "ml-100k"),
            split="presplit",
            presplit=str(shared / "benchmarks" / split),
            out=str(out),
        )
    )
