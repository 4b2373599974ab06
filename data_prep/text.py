"""Readable item and user descriptions from whatever metadata a source has.

Item text is the title followed by ``name: value`` attributes, e.g.
``Toy Story (1995); genres: Animation, Children's, Comedy``. User text turns the usual demographic
fields into a phrase (``24-year-old male technician``) and appends any other attributes the same way.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

GENDERS = {"m": "male", "f": "female", "male": "male", "female": "female"}
# MovieLens' occupation "other" says nothing, "none" means no occupation.
VAGUE_OCCUPATIONS = {"other", "other or not specified", ""}
DEMOGRAPHIC = ("age", "gender", "occupation")


def _attributes(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """``name: value`` pairs joined by "; ", skipping empty values."""
    parts = pd.Series("", index=df.index)
    for name in columns:
        values = df[name].astype(str).str.strip()
        piece = (name.replace("_", " ") + ": " + values).where(values != "", "")
        parts = parts.str.cat(piece, sep="; ").str.strip("; ")
    return parts


def item_text(items: pd.DataFrame) -> pd.Series:
    """Title plus every non-empty attribute (columns other than ``item``/``title``), in column order."""
    title = items["title"].astype(str).str.strip() if "title" in items else pd.Series("", index=items.index)
    attrs = _attributes(items, [c for c in items.columns if c not in ("item", "title")])
    return title.str.cat(attrs, sep="; ").str.strip("; ")


def demographic_phrase(age: str, gender: str, occupation: str) -> str:
    """``24-year-old male technician``; an age band gives ``male technician, aged 18-24``."""
    age, gender, occupation = age.strip(), gender.strip(), occupation.strip()
    gender = GENDERS.get(gender.lower(), gender)
    if occupation.lower() in VAGUE_OCCUPATIONS:
        occupation = ""
    elif occupation.lower() == "none":
        occupation = "with no occupation"
    numeric_age = re.fullmatch(r"\d+(\.\d+)?", age) is not None
    words = [f"{age}-year-old" if numeric_age else "", gender]
    if occupation.startswith("with ") and not any(words):
        words.append("person")
    phrase = " ".join(w for w in [*words, occupation] if w)
    if age and not numeric_age:
        phrase = f"{phrase}, aged {age}" if phrase else f"aged {age}"
    return phrase


def user_text(users: pd.DataFrame) -> pd.Series:
    """Demographic phrase (age/gender/occupation when present) followed by the other attributes."""
    columns = [users[c].astype(str) if c in users else [""] * len(users) for c in DEMOGRAPHIC]
    # one phrase per distinct (age, gender, occupation): a few hundred, however many users
    codes, distinct = pd.factorize(pd.MultiIndex.from_arrays(columns))
    phrases = np.array([demographic_phrase(*row) for row in distinct], dtype=object)
    phrase = pd.Series(phrases[codes], index=users.index, dtype=object)
    attrs = _attributes(users, [c for c in users.columns if c != "user" and c not in DEMOGRAPHIC])
    return phrase.str.cat(attrs, sep="; ").str.strip("; ")
