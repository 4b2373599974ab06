"""llmrec: turn a pretrained causal language model into a recommender."""

from __future__ import annotations

from typing import Any

from common import __version__

__all__ = ["Recommender", "__version__"]


def __getattr__(name: str) -> Any:
    """``llmrec.Recommender`` without importing torch/transformers on ``import llmrec``."""
    if name == "Recommender":
        from llmrec.recommender import Recommender

        return Recommender
    raise AttributeError(f"module 'llmrec' has no attribute {name!r}")
