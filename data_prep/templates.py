"""Prompt templates for the three corpora (CLLM4Rec's wording by default)."""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from common import placeholders
from data_prep.errors import DataError

# The fields each template may use; anything else in a template is a typo.
_ALLOWED = {
    "collaborative": {"user"},
    "review": {"user", "item"},
    "item": {"item"},
    "user": {"user"},
    "finetune": {"user", "history"},
}


@dataclass(frozen=True)
class Templates:
    """Format strings for corpus prompts; ``{user}``, ``{item}`` and ``{history}`` are filled in."""

    collaborative: str = "<user_{user}> has interacted with"
    review: str = "<user_{user}> writes the following review for <item_{item}>:"
    item: str = "<item_{item}> is described as:"
    user: str = "<user_{user}> is described as:"
    finetune: str = "<user_{user}> has interacted with {history}, <user_{user}> will interact with"

    def __post_init__(self) -> None:
        for name, allowed in _ALLOWED.items():
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DataError(
                    f"must be a format string, got {type(value).__name__}", field=f"templates.{name}"
                )
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
            except ValueError as err:
                raise DataError(f"not a valid format string: {err}", field=f"templates.{name}") from err
            unknown = used - allowed
            if unknown:
                raise DataError(
                    f"unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}",
                    field=f"templates.{name}",
                )

    @staticmethod
    def history(items: Iterable[int]) -> str:
        """Item placeholders joined by single spaces, e.g. ``<item_3> <item_7>``."""
        return placeholders.history(items)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "templates") -> Templates:
        """Build from a mapping (a manifest or a user's JSON/YAML); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f"unknown template name(s) {unknown}; known: {sorted(known)}", file=source)
        return cls(**values)
