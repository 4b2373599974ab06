"""``python -m data_prep build``: source files -> validated tables -> filters -> splits -> corpora -> bundle."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml

from common import __version__
from common.io import ArtifactError, atomic_directory, sha256_file
from data_prep import readers
from data_prep.bundle import FORMAT_VERSION, write_tables
from data_prep.corpora import collaborative_corpus, content_corpus, finetune_corpus
from data_prep.errors import DataError
from data_prep.process import (
    align_metadata,
    apply_threshold,
    compact,
    drop_duplicates,
    encode,
    k_core,
    sorted_ids,
)
from data_prep.splits import SPLITS, leave_one_out, random_split, sort_rows, temporal_split
from data_prep.templates import Templates
from data_prep.text import item_text, user_text

logger = logging.getLogger(__name__)

FORMATS = ("recbole", "movielens", "amazon", "csv")


@dataclass
class BuildConfig:
    """Everything ``build`` needs; the CLI parses it with HfArgumentParser (``--config`` YAML works too)."""

    input: str = field(metadata={"help": "source directory or file"})
    out: str = field(metadata={"help": "bundle directory to create"})
    format: Literal["recbole", "movielens", "amazon", "csv"] = field(
        default="recbole", metadata={"help": "source format"}
    )
    split: Literal["random", "temporal", "loo", "presplit"] = field(
        default="random",
        metadata={"help": "per-user random/temporal ratios, leave-one-out, or a fixed split"},
    )
    presplit: str | None = field(
        default=None, metadata={"help": "directory of train/valid/test.tsv (--split presplit)"}
    )
    ratios: list[float] = field(
        default_factory=lambda: [0.8, 0.1, 0.1], metadata={"help": "train valid test"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random split and the finetune masks"})
    rating_threshold: float | None = field(
        default=None,
        metadata={"help": "keep interactions rated at least this; unset, every interaction counts"},
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


def read_source(config: BuildConfig) -> readers.SourceTables:
    """Dispatch to the reader of ``config.format``."""
    if config.format == "recbole":
        return readers.read_recbole(config.input)
    if config.format == "movielens":
        return readers.read_movielens(config.input)
    if config.format == "amazon":
        return readers.read_amazon(config.input, meta=config.item_meta)
    if config.format == "csv":
        return readers.read_csv_source(
            config.input,
            readers.ColumnMap(
                user=config.user_col,
                item=config.item_col,
                rating=config.rating_col,
                timestamp=config.time_col,
                text=config.text_col,
            ),
            item_meta=config.item_meta,
            user_meta=config.user_meta,
        )
    raise DataError(f"unknown format {config.format!r}; expected one of {list(FORMATS)}", field="format")


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


def _presplit(
    config: BuildConfig,
) -> tuple[dict[str, pd.DataFrame], list[str], list[str], list[Path]]:
    """Fixed split: id maps over the union of the three files; valid/test users need training rows."""
    if config.presplit is None:
        raise DataError("--split presplit needs --presplit DIR (train/valid/test.tsv)", field="presplit")
    if config.rating_threshold is not None or config.k_core > 1:
        raise DataError(
            "a fixed split cannot be filtered; drop --rating_threshold/--k_core", field="presplit"
        )
    parts = readers.read_presplit(config.presplit)
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
    return splits, user_ids, item_ids, files


def _split(
    config: BuildConfig, raw: pd.DataFrame
) -> tuple[dict[str, pd.DataFrame], list[str], list[str], dict]:
    """Filter (threshold, duplicates, k-core), index, split. Ids are encoded to integers first so
    that duplicate removal and k-core work on int columns, then renumbered contiguously."""
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
    ratios = tuple(config.ratios)
    if config.split == "random":
        splits = random_split(coded, len(user_ids), ratios, config.seed)
    elif config.split == "temporal":
        splits = temporal_split(coded, len(user_ids), ratios)
    elif config.split == "loo":
        splits = leave_one_out(coded, len(user_ids))
    else:
        raise DataError(f"unknown split {config.split!r}", field="split")
    return splits, user_ids, item_ids, filters


def _reviews(
    tables: readers.SourceTables, train: pd.DataFrame, user_ids: list[str], item_ids: list[str]
) -> pd.DataFrame | None:
    """Reviews of training interactions only (a held-out review would leak its target)."""
    if tables.reviews is None:
        return None
    reviews = tables.reviews[tables.reviews["text"].str.strip() != ""]
    coded = pd.DataFrame(
        {
            "user": encode(reviews["user"], user_ids),
            "item": encode(reviews["item"], item_ids),
            "text": reviews["text"].to_numpy(),
        }
    )
    coded = coded.merge(train[["user", "item"]].drop_duplicates(), on=["user", "item"], how="inner")
    return coded.sort_values(["user", "item"], kind="stable").reset_index(drop=True)


def build(config: BuildConfig) -> Path:
    """Build the bundle at ``config.out`` and return its path; raises :class:`DataError` on bad input."""
    start = time.perf_counter()
    try:
        with atomic_directory(config.out, overwrite=config.overwrite) as tmp:
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
    tables = read_source(config)
    logger.info("read %d interactions from %s", len(tables.interactions), tables.interactions_file)
    known_users = set(pd.unique(tables.interactions["user"]))
    known_items = set(pd.unique(tables.interactions["item"]))
    files = list(tables.files)
    if config.split == "presplit":
        splits, user_ids, item_ids, split_files = _presplit(config)
        files += split_files
        filters = {"rating_threshold": None, "k_core": 0, "duplicates_removed": 0}
        known_users |= set(user_ids)
        known_items |= set(item_ids)
        protocol = {"protocol": "presplit", "source": str(config.presplit), "seed": None}
    else:
        splits, user_ids, item_ids, filters = _split(config, tables.interactions)
        protocol = {"protocol": config.split, "seed": config.seed if config.split == "random" else None}
        if config.split in ("random", "temporal"):
            protocol["ratios"] = list(config.ratios)
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
    reviews = _reviews(tables, splits["train"], user_ids, item_ids)
    corpora = {
        "collaborative": collaborative_corpus(splits["train"], templates),
        "content": content_corpus(templates, items_text, users_text, reviews),
        "finetune": finetune_corpus(splits["train"], templates, config.seed, config.finetune_keep),
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": {
            "format": config.format,
            "input": str(config.input),
            "files": {str(p): sha256_file(p) for p in files},
        },
        "counts": {
            "users": len(user_ids),
            "items": len(item_ids),
            **{name: len(splits[name]) for name in SPLITS},
            **{f"corpus_{name}": len(ds) for name, ds in corpora.items()},
        },
        "split": protocol,
        "filters": filters,
        "finetune_keep": config.finetune_keep,
        "templates": templates.to_dict(),
        "data_prep_version": __version__,
    }
    write_tables(
        tmp,
        manifest=manifest,
        user_ids=user_ids,
        user_text=users_text,
        item_ids=item_ids,
        item_titles=titles,
        item_text=items_text,
        splits=splits,
        corpora=corpora,
    )
    return manifest["counts"]


def build_ml100k_reference(shared: str | Path, out: str | Path) -> Path:
    """MovieLens-100K on the fixed per-user random split in ``shared`` (``../shared`` beside a checkout):
    the bundle that the project's tests and quality numbers use."""
    shared = Path(shared)
    return build(
        BuildConfig(
            format="recbole",
            input=str(shared / "datasets" / "ml-100k"),
            split="presplit",
            presplit=str(shared / "benchmarks" / "ml-100k-random"),
            out=str(out),
        )
    )
