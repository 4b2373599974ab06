"""What every item indexer shares: the saved item -> code tuple map and its quality figures.

An :class:`ItemIndex` holds one code tuple per item as an int array ``(n_items, max_len)``; shorter
tuples (collaborative indexing, SentencePiece pieces) are padded with ``-1`` at the end. Position
``k`` of a tuple is drawn from codebook ``k`` (``codebook_sizes[k]`` codes), except when
``shared_codebook`` is set: then every position draws from the single codebook (pieces).
Saved as ``index.json`` + ``codes.safetensors`` (+ named artifacts such as the RQ-VAE weights).
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.artifacts import Kind, recover, write_directory
from llmrec.trie import PAD, Trie

if TYPE_CHECKING:
    import pandas as pd

    from llmrec.tokens import RecVocab

INDEX_FILE = "index.json"
CODES_FILE = "codes.safetensors"
INDEX = Kind("item index", INDEX_FILE)
FORMAT_VERSION = 1


@dataclasses.dataclass
class ItemIndex:
    """Item -> code tuple map of one indexing method, with its quality figures."""

    codes: np.ndarray
    codebook_sizes: tuple[int, ...]
    method: str
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    shared_codebook: bool = False
    artifacts: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.codes = np.asarray(self.codes, dtype=np.int64)
        self.codebook_sizes = tuple(int(k) for k in self.codebook_sizes)
        if self.codes.ndim != 2 or self.codes.shape[1] == 0:
            raise ValueError(f"codes must have shape (n_items, levels), got {self.codes.shape}")
        expected = 1 if self.shared_codebook else self.codes.shape[1]
        if len(self.codebook_sizes) != expected:
            raise ValueError(
                f"{len(self.codebook_sizes)} codebook sizes for codes of shape {self.codes.shape}"
            )
        valid = self.codes >= 0
        if not valid[:, 0].all() or (valid[:, 1:] & ~valid[:, :-1]).any():
            raise ValueError("every code tuple needs a first code and -1 padding only at its end")
        limits = np.broadcast_to(np.asarray(self.codebook_sizes), self.codes.shape)
        if (self.codes >= limits).any():
            bad = np.argwhere(self.codes >= limits)[0]
            raise ValueError(
                f"item {bad[0]}: code {self.codes[tuple(bad)]} at position {bad[1]} >= codebook size"
            )

    @property
    def n_items(self) -> int:
        return self.codes.shape[0]

    @property
    def max_len(self) -> int:
        return self.codes.shape[1]

    def lengths(self) -> np.ndarray:
        return (self.codes >= 0).sum(1)

    def code(self, item: int) -> tuple[int, ...]:
        row = self.codes[item]
        return tuple(int(c) for c in row[row >= 0])

    def is_unique(self) -> bool:
        return collision_stats(self.codes)["n_unique"] == self.n_items

    def trie(self) -> Trie:
        """Every code tuple as a prefix trie (colliding tuples are refused: they name no single item)."""
        return Trie(self.codes, unique=True)

    def token_ids(self, vocab: RecVocab) -> np.ndarray:
        """(n_items, max_len) semantic token ids of every item in ``vocab`` (-1 = padding)."""
        if vocab.semantic_codebooks != self.codebook_sizes:
            raise ValueError(
                f"vocab semantic codebooks {vocab.semantic_codebooks} != index codebooks {self.codebook_sizes}"
            )
        levels = np.zeros(self.max_len, dtype=np.int64) if self.shared_codebook else np.arange(self.max_len)
        starts = np.array([vocab.level_range(int(k)).start for k in levels])
        return np.where(self.codes >= 0, self.codes + starts, PAD)

    # ------------------------------------------------------------- save/load
    def save(
        self,
        directory: str | Path,
        overwrite: bool = False,
        inputs: Mapping[str, str | Path | None] | None = None,
    ) -> Path:
        """Write the index into ``directory`` atomically (`common.artifacts.write_directory`): an existing
        directory is replaced only with ``overwrite`` and only when it is an item index (has index.json);
        ``inputs`` (``{"--data": bundle}``) may hold it but never be it or lie inside it."""
        directory = Path(directory)
        with write_directory(directory, INDEX, overwrite=overwrite, inputs=inputs, nested={"--data"}) as tmp:
            self.write_files(tmp)
        return directory

    def write_files(self, directory: Path) -> None:
        """The index's files (``index.json``, ``codes.safetensors``, the artifacts) into ``directory``, which
        the caller's guarded writer owns (:meth:`save`; `llmrec.bundle.write_bundle`'s ``index/``)."""
        directory.mkdir(exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "n_items": self.n_items,
            "max_len": self.max_len,
            "codebook_sizes": list(self.codebook_sizes),
            "shared_codebook": self.shared_codebook,
            "artifacts": sorted(self.artifacts),
            "stats": self.stats,
            "config": self.config,
        }
        (directory / INDEX_FILE).write_text(
            json.dumps(meta, indent=2, default=_json_default), encoding="utf-8"
        )
        save_file({"codes": torch.from_numpy(self.codes)}, directory / CODES_FILE)
        for name, blob in self.artifacts.items():
            (directory / _artifact_name(name, directory / INDEX_FILE)).write_bytes(blob)

    @classmethod
    def load(cls, directory: str | Path) -> ItemIndex:
        """The index saved in ``directory`` (after :func:`~common.artifacts.recover`: a save killed while
        renaming leaves the old or new index beside it)."""
        recover(directory)
        return cls.read(directory)

    @classmethod
    def read(cls, directory: str | Path) -> ItemIndex:
        """The index's files as they are (no recovery, nothing renamed: a verified bundle's ``index/``).
        Only ``index.json``, ``codes.safetensors`` and the artifacts it names, each a plain file name in
        ``directory``, are opened."""
        directory = Path(directory)
        meta_path = directory / INDEX_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{meta_path}: no item index saved here") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path}: not valid JSON: {err}") from err
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r}")
        codes = load_file(directory / CODES_FILE)["codes"].numpy()
        if codes.shape != (meta["n_items"], meta["max_len"]):
            raise ValueError(
                f"{directory / CODES_FILE}: codes shape {codes.shape} disagrees with {meta_path}"
            )
        try:
            return cls(
                codes=codes,
                codebook_sizes=tuple(meta["codebook_sizes"]),
                method=meta["method"],
                stats=meta["stats"],
                config=meta["config"],
                shared_codebook=meta["shared_codebook"],
                artifacts={
                    name: (directory / _artifact_name(name, meta_path)).read_bytes()
                    for name in meta["artifacts"]
                },
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{meta_path}: invalid item index: {err}") from err


def _artifact_name(name: object, meta_path: Path) -> str:
    """An artifact's name: a plain file name beside ``index.json`` (never a path out of the directory)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{meta_path}: artifact name {name!r} is not a plain file name")
    if name in (INDEX_FILE, CODES_FILE):
        raise ValueError(f"{meta_path}: artifact name {name!r} is one of the index's own files")
    return name


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ------------------------------------------------------------------ quality figures
def collision_stats(codes: np.ndarray) -> dict[str, Any]:
    """How many items share a code tuple with another item.

    ``collision_rate`` = 1 - unique tuples / items (the share of items that need a new ID);
    ``colliding_items`` = share of items whose tuple is not unique; ``max_group`` = largest group.
    """
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    n = len(codes)
    return {
        "n_unique": len(counts),
        "collision_rate": 1.0 - len(counts) / n,
        "colliding_items": float((counts[inverse.reshape(-1)] > 1).mean()),
        "max_group": int(counts.max()),
    }


def codebook_stats(
    codes: np.ndarray, codebook_sizes: Sequence[int], shared: bool = False
) -> dict[str, list[float]]:
    """Per position: share of the codebook in use and perplexity (exp entropy) of the code usage."""
    columns = [codes[codes >= 0]] if shared else [col[col >= 0] for col in codes.T]
    utilisation, perplexity = [], []
    for col, size in zip(columns, codebook_sizes, strict=True):
        counts = np.bincount(col, minlength=size)
        p = counts[counts > 0] / counts.sum()
        utilisation.append(float((counts > 0).sum() / size))
        perplexity.append(float(np.exp(-(p * np.log(p)).sum())))
    return {"utilisation": utilisation, "perplexity": perplexity}


def index_stats(codes: np.ndarray, codebook_sizes: Sequence[int], shared: bool = False) -> dict[str, Any]:
    lengths = (codes >= 0).sum(1)
    return {
        **collision_stats(codes),
        **codebook_stats(codes, codebook_sizes, shared),
        "mean_tokens_per_item": float(lengths.mean()),
    }


def digits(numbers: np.ndarray, base: int) -> np.ndarray:
    """Numbers 0..n-1 as fixed-length base-``base`` digit tuples (most significant first)."""
    n = int(numbers.max()) + 1 if len(numbers) else 1
    levels = max(1, int(np.ceil(np.log(n) / np.log(base) - 1e-9)))
    while base**levels < n:  # guard against float rounding
        levels += 1
    powers = base ** np.arange(levels - 1, -1, -1, dtype=np.int64)
    return (numbers[:, None] // powers) % base


# ------------------------------------------------------------------ indexer interface
@dataclasses.dataclass
class IndexData:
    """What indexers may read; each indexer checks for the fields it needs.

    ``interactions``: training interactions (columns user, item, timestamp; contiguous item
    indices). ``embeddings``: (n_items, d) item content embeddings (see ``encoders``).
    """

    n_items: int
    interactions: pd.DataFrame | None = None
    embeddings: np.ndarray | None = None

    def require(self, field: str, method: str) -> Any:
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"indexing method {method!r} needs {field}")
        if field == "embeddings" and len(value) != self.n_items:
            raise ValueError(f"{len(value)} item embeddings for {self.n_items} items")
        return value


class Indexer(ABC):
    """One way of giving items code tuples. Subclasses set ``method`` and implement ``build``."""

    method: ClassVar[str]

    @abstractmethod
    def build(self, data: IndexData) -> ItemIndex:
        """Index every item ``0..data.n_items-1``; the result is unique unless stated otherwise."""

    def make_index(
        self, codes: np.ndarray, codebook_sizes: Sequence[int], config: Any, **stats: Any
    ) -> ItemIndex:
        """Wrap codes into an ItemIndex with the common quality figures."""
        return ItemIndex(
            codes=codes,
            codebook_sizes=tuple(codebook_sizes),
            method=self.method,
            stats={**index_stats(codes, codebook_sizes), **stats},
            config=dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
        )


def describe(index: ItemIndex) -> str:
    """A plain-text report of an index's quality figures (for recipes and benchmarks to print)."""
    s = index.stats
    lines = [
        f"method {index.method}: {index.n_items} items, up to {index.max_len} tokens/item "
        f"(mean {s.get('mean_tokens_per_item', float(index.lengths().mean())):.3f}), "
        f"codebooks {list(index.codebook_sizes)}{' shared' if index.shared_codebook else ''}",
        f"unique IDs {s['n_unique']}/{index.n_items}, collision rate {s['collision_rate']:.4f}",
    ]
    for name, fmt in (("collision_rate_before", ".4f"), ("recon_mse_before", ".6f"), ("recon_mse", ".6f")):
        if name in s:
            lines.append(f"{name} {s[name]:{fmt}}")
    lines.append("position  utilisation  perplexity")
    for k, (u, p) in enumerate(zip(s["utilisation"], s["perplexity"], strict=True)):
        lines.append(f"{k:>8}  {u:>11.4f}  {p:>10.2f}")
    return "\n".join(lines)


def shared_attribute_ratio(first_codes: np.ndarray, attributes: Sequence[set[str]]) -> dict[str, float]:
    """How much more often items with the same first code share an attribute (e.g. a genre) than random pairs.

    Returns P(share | same code), P(share | any pair) over distinct item pairs and their ratio.
    Exact over all pairs, O(n²) memory: meant for catalogues up to a few ten thousand items.
    """
    names = sorted(set().union(*attributes))
    column = {name: k for k, name in enumerate(names)}
    hot = np.zeros((len(attributes), len(names)), dtype=np.float32)
    for i, attrs in enumerate(attributes):
        hot[i, [column[a] for a in attrs]] = 1.0
    share = (hot @ hot.T) > 0
    same = first_codes[:, None] == first_codes[None, :]
    off_diagonal = ~np.eye(len(first_codes), dtype=bool)
    p_same = float(share[same & off_diagonal].mean())
    p_all = float(share[off_diagonal].mean())
    return {"p_share_same_code": p_same, "p_share_random_pair": p_all, "ratio": p_same / p_all}
