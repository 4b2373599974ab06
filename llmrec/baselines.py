"""Classical recommenders scored with the same metric code as the LLM: Pop, EASE and Mult-VAE.

All three share one small interface so that a recipe can treat them alike:

- ``fit(train, valid=None)`` learns from a binary (n_users, n_items) csr matrix; when ``valid`` is given,
  hyperparameters (EASE's lambda, Mult-VAE's epoch) are chosen on it by NDCG@100 with the training items
  excluded, the protocol of :func:`llmrec.metrics.evaluate_matrices`.
- ``score(users, history)`` returns dense (len(users), n_items) float32 scores computed from the users'
  rows of ``history`` (the input interactions; the project uses the training matrix, like the LLM's prompt).
- ``fit_info`` records what was chosen, for result files.

They are written here rather than taken from RecBole, whose models come bound to its own dataset and
trainer classes; each is a few dozen lines.
"""

from __future__ import annotations

import copy
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmrec.metrics import evaluate_matrices

logger = logging.getLogger(__name__)

SELECT_METRIC = "ndcg@100"


def binarize(matrix: sp.spmatrix) -> sp.csr_matrix:
    """A float32 csr copy with every stored non-zero set to 1 (implicit feedback)."""
    out = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    out.eliminate_zeros()
    out.data[:] = 1.0
    return out


class Baseline(ABC):
    """Common interface of the classical recommenders."""

    name: str = ""

    def __init__(self) -> None:
        self.fit_info: dict[str, Any] = {}
        self.n_items: int | None = None
        self.history: sp.csr_matrix | None = None

    def fit(self, train: sp.spmatrix, valid: sp.spmatrix | None = None) -> Baseline:
        """Learn from ``train``, which is also the history users are scored from; choose hyperparameters
        on ``valid`` when given."""
        self.history = binarize(train)
        self.n_items = self.history.shape[1]
        self._fit(self.history, valid)
        return self

    @abstractmethod
    def _fit(self, train: sp.csr_matrix, valid: sp.spmatrix | None) -> None:
        """Learn from the binary training matrix."""

    @abstractmethod
    def _score(self, history: sp.csr_matrix) -> np.ndarray:
        """Scores for the binary history rows of a batch of users."""

    def score(self, users: np.ndarray) -> np.ndarray:
        """Dense (len(users), n_items) float32 scores from the users' training rows (`llmrec.metrics.Scorer`)."""
        if self.history is None:
            raise RuntimeError(f"{type(self).__name__}.score called before fit")
        return self.score_rows(self.history[np.asarray(users)])

    def score_rows(self, history: sp.spmatrix) -> np.ndarray:
        """Dense (rows, n_items) float32 scores of arbitrary interaction rows (users folded in)."""
        if self.n_items is None:
            raise RuntimeError(f"{type(self).__name__}.score_rows called before fit")
        if history.shape[1] != self.n_items:
            raise ValueError(f"history has {history.shape[1]} items, the model was fit on {self.n_items}")
        return np.asarray(self._score(binarize(history)), dtype=np.float32)

    def _valid_ndcg(self, train: sp.csr_matrix, valid: sp.spmatrix, batch_size: int = 1024) -> float:
        """NDCG@100 on ``valid`` with ``train`` as input history and exclusion."""
        result = evaluate_matrices(self, valid, train, batch_size=batch_size, ks=(100,))
        return result[SELECT_METRIC]


class Pop(Baseline):
    """Most popular items: every user gets the training interaction counts of the items."""

    name = "pop"

    def _fit(self, train: sp.csr_matrix, valid: sp.spmatrix | None) -> None:
        self.counts = np.asarray(train.sum(axis=0), dtype=np.float32).ravel()

    def _score(self, history: sp.csr_matrix) -> np.ndarray:
        return np.tile(self.counts, (history.shape[0], 1))


class EASE(Baseline):
    """EASE (Steck, 2019): item-item weights ``B = argmin ||X - XB||² + λ||B||²`` with ``diag(B) = 0``.

    Closed form: ``P = (XᵀX + λI)⁻¹``, ``B = -P / diag(P)`` (column j divided by ``P[j, j]``), diagonal 0.
    With ``valid``, λ is chosen from ``lambdas`` by NDCG@100; without it ``lambdas`` must hold one value.
    Memory and time are O(n_items²) and O(n_items³) (the Gram matrix is dense, float64).
    """

    name = "ease"
    DEFAULT_LAMBDAS = (10.0, 50.0, 100.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 2000.0, 5000.0)

    def __init__(self, lambdas: Sequence[float] = DEFAULT_LAMBDAS) -> None:
        super().__init__()
        if not lambdas or any(lam <= 0 for lam in lambdas):
            raise ValueError(f"EASE lambdas must be positive, got {list(lambdas)}")
        self.lambdas = tuple(float(lam) for lam in lambdas)

    def _fit(self, train: sp.csr_matrix, valid: sp.spmatrix | None) -> None:
        if valid is None and len(self.lambdas) > 1:
            raise ValueError("EASE.fit needs valid to choose among several lambdas, or a single lambda")
        gram = (train.T @ train).toarray().astype(np.float64)
        # one eigendecomposition serves the whole grid: (G + λI)⁻¹ = V diag(1 / (w + λ)) Vᵀ
        eigvals, eigvecs = np.linalg.eigh(gram)
        grid: dict[float, float] = {}
        best: tuple[float, float, np.ndarray] | None = None
        for lam in self.lambdas:
            precision = (eigvecs / (eigvals + lam)) @ eigvecs.T
            self.weights = (precision / -np.diag(precision)).astype(np.float32)
            np.fill_diagonal(self.weights, 0.0)
            if valid is None:
                best = (lam, math.nan, self.weights)
                break
            grid[lam] = self._valid_ndcg(train, valid)
            logger.info("EASE lambda=%g: valid %s %.4f", lam, SELECT_METRIC, grid[lam])
            if best is None or grid[lam] > best[1]:
                best = (lam, grid[lam], self.weights)
        self.lam, valid_score, self.weights = best
        self.fit_info = {"lambda": self.lam, f"valid_{SELECT_METRIC}": valid_score, "grid": grid}

    def _score(self, history: sp.csr_matrix) -> np.ndarray:
        return np.asarray(history @ self.weights)


class MultVAENet(nn.Module):
    """Mult-VAE network (Liang et al., 2018): L2-normalised, dropped-out input -> tanh MLP -> Gaussian z -> logits."""

    def __init__(self, n_items: int, hidden: int = 600, latent: int = 200, dropout: float = 0.5) -> None:
        super().__init__()
        self.latent = latent
        self.dropout = dropout
        self.encoder = nn.Sequential(nn.Linear(n_items, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, n_items))
        for layer in (*self.encoder, *self.decoder):
            if isinstance(layer, nn.Linear):  # the paper's init: Xavier weights, N(0, 0.001) biases
                nn.init.xavier_normal_(layer.weight)
                nn.init.normal_(layer.bias, std=0.001)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits over items, and the posterior mean and log-variance; z is sampled only in training."""
        h = F.dropout(F.normalize(x, dim=1), p=self.dropout, training=self.training)
        mu, logvar = self.encoder(h).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decoder(z), mu, logvar


class MultVAE(Baseline):
    """Mult-VAE with the paper's training: Adam, multinomial likelihood, KL weight annealed to ``anneal_cap``.

    β grows by ``1 / anneal_steps`` per update up to ``anneal_cap`` (the paper's schedule). The paper's
    200 000 steps suit ML-20M, where β reaches 0.2 after ~170 epochs; on a small dataset they would leave
    β near 0, so by default (``anneal_steps=None``) β reaches ``anneal_cap`` halfway through ``epochs``.
    With ``valid``,
    NDCG@100 is measured after every epoch; training stops after ``patience`` epochs without improvement
    and the best epoch's weights are kept. Seeded: the same seed gives the same weights on CPU.
    """

    name = "multvae"

    def __init__(
        self,
        hidden: int = 600,
        latent: int = 200,
        dropout: float = 0.5,
        epochs: int = 200,
        batch_size: int = 500,
        lr: float = 1e-3,
        anneal_cap: float = 0.2,
        anneal_steps: int | None = None,
        patience: int = 50,
        seed: int = 0,
        device: str | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if epochs < 1 or batch_size < 1 or not 0 < anneal_cap <= 1:
            raise ValueError(
                f"Mult-VAE needs epochs, batch_size >= 1 and 0 < anneal_cap <= 1; got {epochs}, {batch_size}, {anneal_cap}"
            )
        self.hidden, self.latent, self.dropout = hidden, latent, dropout
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.anneal_cap, self.anneal_steps, self.patience = anneal_cap, anneal_steps, patience
        self.seed, self.progress = seed, progress
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _rows(self, matrix: sp.csr_matrix) -> torch.Tensor:
        return torch.from_numpy(matrix.toarray()).to(self.device)

    def _fit(self, train: sp.csr_matrix, valid: sp.spmatrix | None) -> None:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            self.net = MultVAENet(self.n_items, self.hidden, self.latent, self.dropout).to(self.device)
            self._train(train, valid)

    def _train(self, train: sp.csr_matrix, valid: sp.spmatrix | None) -> None:
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        n_users = train.shape[0]
        step, best_score, best_epoch, best_state = 0, -math.inf, 0, None
        anneal_steps = self.anneal_steps
        if anneal_steps is None:  # β reaches anneal_cap after half of the epochs
            anneal_steps = max(1, math.ceil(n_users / self.batch_size) * self.epochs // 2) / self.anneal_cap
        epochs = tqdm(range(1, self.epochs + 1), desc="Mult-VAE", unit="epoch", disable=not self.progress)
        for epoch in epochs:
            self.net.train()
            total = 0.0
            order = torch.randperm(n_users).numpy()
            for start in range(0, n_users, self.batch_size):
                x = self._rows(train[order[start : start + self.batch_size]])
                logits, mu, logvar = self.net(x)
                beta = min(self.anneal_cap, step / anneal_steps)
                nll = -(F.log_softmax(logits, dim=1) * x).sum(dim=1).mean()
                kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()
                loss = nll + beta * kl
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                total += float(loss.detach()) * x.shape[0]
            if valid is None:
                continue
            score = self._valid_ndcg(train, valid)
            logger.debug(
                "Mult-VAE epoch %d: loss %.3f, beta %.3f, valid %s %.4f",
                epoch,
                total / n_users,
                beta,
                SELECT_METRIC,
                score,
            )
            if score > best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(self.net.state_dict())
            elif epoch - best_epoch >= self.patience:
                break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.fit_info = {
            "best_epoch": best_epoch if valid is not None else self.epochs,
            "epochs_run": epoch,
            "updates": step,
            "anneal_steps": anneal_steps,
            "final_beta": beta,
            f"valid_{SELECT_METRIC}": best_score if valid is not None else math.nan,
        }
        logger.info("Mult-VAE: %s", self.fit_info)

    @torch.no_grad()
    def _score(self, history: sp.csr_matrix) -> np.ndarray:
        self.net.eval()
        logits, _, _ = self.net(self._rows(history))
        return logits.float().cpu().numpy()


BASELINES: dict[str, type[Baseline]] = {cls.name: cls for cls in (Pop, EASE, MultVAE)}


def make_baseline(name: str, **kwargs: Any) -> Baseline:
    """Instantiate a baseline by its name ("pop", "ease", "multvae")."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}") from None
    return cls(**kwargs)
