"""The index report: what a user checks before training on an index (``recipes/index.py`` prints and saves it).

Per level how much of the codebook is used, collisions before and after resolution, how many items share
a leaf (a full code tuple) and a last-level prefix, and the reconstruction error where the method has one
(RQ-VAE, RQ-KMeans). Indexers that number items (random, sequential, collaborative) are unique by
construction: their figures before resolution are those after.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmrec.indexing.base import ItemIndex, codebook_stats, collision_stats
from llmrec.indexing.collisions import leaf_sizes

REPORT_FILE = "report.json"
RECONSTRUCTION = ("embedding_variance", "recon_mse_before", "recon_mse_by_level", "recon_mse")


def index_report(index: ItemIndex) -> dict[str, Any]:
    """The report of ``index`` as a JSON-ready dict."""
    codes, stats = index.codes, index.stats
    after = {
        **collision_stats(codes),
        **codebook_stats(codes, index.codebook_sizes, index.shared_codebook),
        "items_per_leaf": leaf_sizes(codes),
    }
    before = stats.get("before_resolution", after)
    levels = []
    for k, size in enumerate(index.codebook_sizes):
        level: dict[str, Any] = {"level": k, "codebook_size": size}
        for name, figures in (("before", before), ("after", after)):
            if k < len(figures["utilisation"]):  # an extra level exists after resolution only
                level[f"codes_used_{name}"] = round(figures["utilisation"][k] * size)
                level[f"utilisation_{name}"] = figures["utilisation"][k]
                level[f"perplexity_{name}"] = figures["perplexity"][k]
        levels.append(level)
    report: dict[str, Any] = {
        "method": index.method,
        "n_items": index.n_items,
        "codebook_sizes": list(index.codebook_sizes),
        "resolve": index.config.get("resolve", "none needed (unique by construction)"),
        "levels": levels,
        "collisions": {
            name: {
                key: figures[key] for key in ("n_unique", "collision_rate", "colliding_items", "max_group")
            }
            for name, figures in (("before", before), ("after", after))
        },
        "items_per_leaf": {"before": before["items_per_leaf"], "after": after["items_per_leaf"]},
    }
    if index.max_len > 1:
        _, per_prefix = np.unique(codes[:, :-1], axis=0, return_counts=True)
        report["items_per_prefix"] = {
            "prefix_length": index.max_len - 1,
            "prefixes": len(per_prefix),
            "min": int(per_prefix.min()),
            "mean": float(per_prefix.mean()),
            "max": int(per_prefix.max()),
        }
    report["reconstruction"] = {key: stats[key] for key in RECONSTRUCTION if key in stats}
    # items coded after the fit (`llmrec.indexing.newitems`): the figures before resolution omit them
    report["items_added"] = int(stats.get("items_added", 0))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as plain text lines."""
    lines = [
        f"index report: {report['method']}, {report['n_items']} items, codebooks {report['codebook_sizes']}, "
        f"collisions resolved by {report['resolve']}"
    ]
    if report.get("items_added"):
        lines.append(
            f"{report['items_added']} of them coded as new items after the fit: 'before resolution' "
            f"counts the other {report['n_items'] - report['items_added']}"
        )
    for name in ("before", "after"):
        c = report["collisions"][name]
        lines.append(
            f"collisions {name:>6} resolution: {c['n_unique']} unique tuples, rate {c['collision_rate']:.4f}, "
            f"colliding items {c['colliding_items']:.4f}, largest group {c['max_group']}"
        )
    lines.append("level  codebook  used before  used after  perplexity after")
    for level in report["levels"]:
        lines.append(
            f"{level['level']:>5}  {level['codebook_size']:>8}  {level.get('codes_used_before', '-'):>11}  "
            f"{level['codes_used_after']:>10}  {level['perplexity_after']:>16.2f}"
        )
    for name in ("before", "after"):
        leaves = ", ".join(f"{n} items: {count}" for n, count in report["items_per_leaf"][name].items())
        lines.append(f"leaves {name:>6} resolution by items per leaf: {leaves}")
    if "items_per_prefix" in report:
        p = report["items_per_prefix"]
        lines.append(
            f"items per {p['prefix_length']}-code prefix: {p['prefixes']} prefixes, "
            f"min {p['min']}, mean {p['mean']:.2f}, max {p['max']}"
        )
    for key, value in report["reconstruction"].items():
        shown = [round(v, 6) for v in value] if isinstance(value, list) else f"{value:.6f}"
        lines.append(f"{key} {shown}")
    return "\n".join(lines)
