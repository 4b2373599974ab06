"""One early-stopping rule for every model trained here: the LLM loop (`llmrec.train`, whose state is
saved in checkpoints) and the Mult-VAE and SASRec baselines (`llmrec.baselines`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EarlyStopping:
    """The best validation score so far, where it was reached, and how many evaluations since brought no
    gain; :attr:`stop` once ``patience`` of them in a row did not (``patience`` 0: never stop early).
    Higher scores are better; a tie is not a gain, so the earliest of equal scores is kept."""

    patience: int
    best: float | None = None
    best_at: int | None = None
    without_gain: int = 0

    def update(self, score: float, at: int) -> bool:
        """Record the score of the evaluation at ``at`` (an epoch or a step); True when it is the new best."""
        if self.best is None or score > self.best:
            self.best, self.best_at, self.without_gain = score, at, 0
            return True
        self.without_gain += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.without_gain >= self.patience
