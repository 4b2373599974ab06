"""The users and items of a dataset: raw ids by contiguous index, item titles, and raw id -> index maps.

A dataset bundle (``data_prep``) builds one from its tables; an export bundle stores one
(``users.json``, ``items.json``) and `llmrec.Recommender` reads it back, so both sides share the same
maps and the same errors for unknown ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from common.errors import NotFoundError, UserError
from common.io import ArtifactError, read_json, write_json

USERS_FILE = "users.json"
ITEMS_FILE = "items.json"


def id_sequence(value: object, what: str) -> Sequence:
    """``value`` if it is a sequence of ids (list, tuple, 1-d array...); a bare string (which would be
    read character by character: ``"538"`` as ids 5, 3 and 8), a mapping or a scalar is a `UserError`."""
    if isinstance(value, (str, bytes, bytearray)):
        shown = value[:50]
        raise UserError(f"{what}: got the string {shown!r} where a list of ids is expected; pass [{shown!r}]")
    if (
        isinstance(value, Mapping)
        or not hasattr(value, "__len__")
        or not hasattr(value, "__iter__")
        or getattr(value, "ndim", 1) != 1
    ):
        raise UserError(f"{what}: expected a list of ids, got a {type(value).__name__}")
    return value


class Catalogue:
    """Raw ids of users and items by index, item titles (and optionally texts) by index, and the reverse
    maps. ``item_texts`` is what a catalogue extended with new items (`llmrec.Recommender.add_items`)
    keeps, so the text-to-ID mapper can be fit again from a saved bundle."""

    def __init__(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        item_titles: Sequence[str],
        item_texts: Sequence[str] | None = None,
    ):
        if len(item_titles) != len(item_ids):
            raise ValueError(f"{len(item_titles)} titles for {len(item_ids)} items")
        if item_texts is not None and len(item_texts) != len(item_ids):
            raise ValueError(f"{len(item_texts)} texts for {len(item_ids)} items")
        self.user_ids, self.item_ids = [str(u) for u in user_ids], [str(i) for i in item_ids]
        self.item_titles = [str(t) for t in item_titles]
        self.item_texts = None if item_texts is None else [str(t) for t in item_texts]
        self.user_index = {raw: index for index, raw in enumerate(self.user_ids)}
        self.item_index = {raw: index for index, raw in enumerate(self.item_ids)}

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user(self, raw_id: str | int, hint: str = "") -> int:
        """Index of a user by raw id; an unknown id is a ``NotFoundError`` (a ``UserError``) with examples (and ``hint``)."""
        return _lookup("user", self.user_index, self.user_ids, raw_id, "", hint)

    def items(self, raw_ids: Sequence[str | int]) -> list[int]:
        """Indices of items by raw id; the error names the first unknown id and its position (a bare string
        is refused, :func:`id_sequence`)."""
        raw_ids = id_sequence(raw_ids, "item ids")
        return [
            _lookup("item", self.item_index, self.item_ids, raw, f" at position {pos}", "")
            for pos, raw in enumerate(raw_ids)
        ]

    def with_items(self, item_ids: Sequence[str], titles: Sequence[str], texts: Sequence[str]) -> Catalogue:
        """This catalogue with new items appended (indices ``n_items`` onwards); items without a text so
        far get ""."""
        old_texts = self.item_texts if self.item_texts is not None else [""] * self.n_items
        return Catalogue(
            self.user_ids,
            [*self.item_ids, *item_ids],
            [*self.item_titles, *titles],
            [*old_texts, *texts],
        )

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``users.json`` (``raw_ids``) and ``items.json`` (``raw_ids``, ``titles``, and ``texts`` when
        kept) into ``directory``."""
        directory = Path(directory)
        items = {"raw_ids": self.item_ids, "titles": self.item_titles}
        if self.item_texts is not None:
            items["texts"] = self.item_texts
        return [
            write_json(directory / USERS_FILE, {"raw_ids": self.user_ids}, ensure_ascii=False),
            write_json(directory / ITEMS_FILE, items, ensure_ascii=False),
        ]

    @classmethod
    def load(cls, directory: str | Path, n_users: int, n_items: int) -> Catalogue:
        """Read what :meth:`save` wrote, checking the counts against what the model was built for."""
        directory = Path(directory)
        users = _read_list(directory / USERS_FILE, "raw_ids", n_users)
        items = _read_list(directory / ITEMS_FILE, "raw_ids", n_items)
        titles = _read_list(directory / ITEMS_FILE, "titles", n_items)
        texts = _read_list(directory / ITEMS_FILE, "texts", n_items, required=False)
        return cls(users, items, titles, texts)


def _lookup(kind: str, index_of: dict[str, int], ids: list[str], raw_id, where: str, hint: str) -> int:
    index = index_of.get(str(raw_id))
    if index is None:
        examples = ", ".join(repr(raw) for raw in ids[:3])
        raise NotFoundError(
            f"unknown {kind} id {str(raw_id)!r}{where}: not one of the {len(ids)} {kind}s of this catalogue "
            f"(e.g. {examples}){hint}"
        )
    return index


def _read_list(path: Path, key: str, length: int, required: bool = True) -> list[str] | None:
    values = read_json(path, "catalogue file")
    if not required and isinstance(values, dict) and key not in values:
        return None
    if not isinstance(values, dict) or not isinstance(values.get(key), list):
        raise ArtifactError(f"expected a JSON object with a list {key!r}", file=path)
    if len(values[key]) != length:
        raise ArtifactError(f"{len(values[key])} {key} but the model's vocabulary says {length}", file=path)
    return [str(value) for value in values[key]]
