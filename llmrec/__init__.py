"""llmrec: turn a pretrained causal language model into a recommender."""

__version__ = "0.1.0"
