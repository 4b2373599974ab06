"""The placeholder grammar: how text refers to a user, an item or a semantic code by index.

``<user_12>``, ``<item_7>`` and ``<s0_31>`` (semantic code 31 at level 0) in corpus text and prompt
templates; ``data_prep`` writes them and ``llmrec.tokens`` maps them to token ids, both from here.
"""

from __future__ import annotations

import re

USER, ITEM, SEMANTIC = "user", "item", "s"  # the default name prefixes


def placeholder(kind: str, index: int) -> str:
    """``<user_12>`` / ``<item_7>``: a user or item (``kind`` is the name prefix) by contiguous index."""
    return f"<{kind}_{int(index)}>"


def semantic_placeholder(prefix: str, level: int, code: int) -> str:
    """``<s0_31>``: code ``code`` of semantic level ``level``."""
    return f"<{prefix}{int(level)}_{int(code)}>"


def history(items, kind: str = ITEM) -> str:
    """Item placeholders joined by single spaces, e.g. ``<item_3> <item_7>``."""
    return " ".join(placeholder(kind, i) for i in items)


def pattern(user: str = USER, item: str = ITEM, semantic: str = SEMANTIC) -> re.Pattern[str]:
    """One regular expression for every placeholder, with the groups ``user``, ``item`` (the prefix
    when that family matched), ``level`` (semantic) and ``index``."""
    user, item, semantic = (re.escape(name) for name in (user, item, semantic))
    return re.compile(rf"<(?:(?P<user>{user})|(?P<item>{item})|{semantic}(?P<level>\d+))_(?P<index>\d+)>")
