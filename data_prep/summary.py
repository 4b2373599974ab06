"""``python -m data_prep inspect``: a readable summary of a bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.bundle import load_bundle
from data_prep.corpora import CORPORA
from data_prep.splits import SPLITS


def _spread(counts: np.ndarray) -> str:
    return f"min {counts.min()} / median {np.median(counts):g} / max {counts.max()}"


def _clip(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def summarize(path: str | Path, examples: int = 3) -> str:
    """Counts, density, interactions per user/item, split sizes and example documents per corpus."""
    bundle = load_bundle(path)
    m = bundle.manifest
    every = pd.concat([bundle.interactions(s) for s in SPLITS])
    n = len(every)
    per_user = np.bincount(every["user"], minlength=bundle.n_users)
    per_item = np.bincount(every["item"], minlength=bundle.n_items)
    split = m.get("split", {})
    lines = [
        f"bundle        {bundle.path}",
        f"source        {m['source']['format']} {m['source']['input']}",
        f"split         {split.get('protocol')}"
        + (f" seed={split['seed']}" if split.get("seed") is not None else "")
        + (f" ratios={split['ratios']}" if "ratios" in split else ""),
        f"filters       {m.get('filters', {})}",
        f"users         {bundle.n_users:,}",
        f"items         {bundle.n_items:,}",
        f"interactions  {n:,}  (density {n / (bundle.n_users * bundle.n_items):.4%})",
        "split sizes   " + "  ".join(f"{s} {len(bundle.interactions(s)):,}" for s in SPLITS),
        f"per user      {_spread(per_user)}",
        f"per item      {_spread(per_item)}",
    ]
    for name in CORPORA:
        corpus = bundle.corpus(name)
        kinds = pd.Series(corpus["kind"]).value_counts().to_dict() if len(corpus) else {}
        lines.append(f"\n[{name}] {len(corpus):,} documents {kinds}")
        for row in corpus.select(range(min(examples, len(corpus)))):
            lines.append(f"  kind={row['kind']} user={row['user']} item={row['item']}")
            lines.append(f"    prompt: {_clip(row['prompt'])}")
            lines.append(f"    main:   {_clip(row['main'])}")
    return "\n".join(lines)
