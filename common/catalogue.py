"""The users and items of a dataset: raw ids by contiguous index, item titles, and raw id -> index maps.

A dataset bundle (``data_prep``) builds one from its tables; an export bundle stores one
(``users.json``, ``items.json``) and `llmrec.Recommender` reads it back, so both sides share the same
maps and the same errors for unknown ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.io import ArtifactError, read_json, write_json

USERS_FILE = "users.json"
ITEMS_FILE = "items.json"


class Catalogue:
    """Raw ids of users and items by index, item titles by index, and the reverse maps."""

    def __init__(self, user_ids: Sequence[str], item_ids: Sequence[str], item_titles: Sequence[str]):
        if len(item_titles) != len(item_ids):
            raise ValueError(f"{len(item_titles)} titles for {len(item_ids)} items")
        self.user_ids, self.item_ids = [str(u) for u in user_ids], [str(i) for i in item_ids]
        self.item_titles = [str(t) for t in item_titles]
        self.user_index = {raw: index for index, raw in enumerate(self.user_ids)}
        self.item_index = {raw: index for index, raw in enumerate(self.item_ids)}

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user(self, raw_id: str | int, hint: str = "") -> int:
        """Index of a user by raw id; an unknown id is a ``ValueError`` with examples (and ``hint``)."""
        return _lookup("user", self.user_index, self.user_ids, raw_id, "", hint)

    def items(self, raw_ids: Sequence[str | int]) -> list[int]:
        """Indices of items by raw id; the error names the first unknown id and its position."""
        return [
            _lookup("item", self.item_index, self.item_ids, raw, f" at position {pos}", "")
            for pos, raw in enumerate(raw_ids)
        ]

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``users.json`` (``raw_ids``) and ``items.json`` (``raw_ids``, ``titles``) into ``directory``."""
        directory = Path(directory)
        return [
            write_json(directory / USERS_FILE, {"raw_ids": self.user_ids}, ensure_ascii=False),
            write_json(
                directory / ITEMS_FILE,
                {"raw_ids": self.item_ids, "titles": self.item_titles},
                ensure_ascii=False,
            ),
        ]

    @classmethod
    def load(cls, directory: str | Path, n_users: int, n_items: int) -> Catalogue:
        """Read what :meth:`save` wrote, checking the counts against what the model was built for."""
        directory = Path(directory)
        users = _read_list(directory / USERS_FILE, "raw_ids", n_users)
        items = _read_list(directory / ITEMS_FILE, "raw_ids", n_items)
        return cls(users, items, _read_list(directory / ITEMS_FILE, "titles", n_items))


def _lookup(kind: str, index_of: dict[str, int], ids: list[str], raw_id, where: str, hint: str) -> int:
    index = index_of.get(str(raw_id))
    if index is None:
        examples = ", ".join(repr(raw) for raw in ids[:3])
        raise ValueError(
            f"unknown {kind} id {str(raw_id)!r}{where}: not one of the {len(ids)} {kind}s of this catalogue "
            f"(e.g. {examples}){hint}"
        )
    return index


def _read_list(path: Path, key: str, length: int) -> list[str]:
    values = read_json(path, "catalogue file")
    if not isinstance(values, dict) or not isinstance(values.get(key), list):
        raise ArtifactError(f"expected a JSON object with a list {key!r}", file=path)
    if len(values[key]) != length:
        raise ArtifactError(f"{len(values[key])} {key} but the model's vocabulary says {length}", file=path)
    return [str(value) for value in values[key]]
