"""Classical recommenders scored with the same metric code as the LLM: Pop, EASE, Mult-VAE and SASRec,
and for cold-start comparisons Random and a content kNN over item text embeddings.

All of them follow one protocol (`llmrec.metrics.Scorer`), so a recipe treats them alike:

- ``fit(...)`` learns and keeps the training history users are scored from; when ``valid`` is given,
  hyperparameters (EASE's lambda, Mult-VAE's epoch, SASRec's epoch and dropout) are chosen on it with
  the training items excluded, the protocol of :func:`llmrec.metrics.evaluate_matrices`. Pop, EASE and
  Mult-VAE fit a binary (n_users, n_items) csr matrix, ``fit(train, valid=None)``; SASRec reads ordered
  sequences, ``fit(sequences, n_items, valid=None)``.
- ``score(users)`` returns dense (len(users), n_items) float32 scores from the users' training history;
  ``score_rows(rows)`` scores other histories (matrix rows, or sequences for SASRec), e.g. the training
  plus validation items when ranking the test split of a leave-one-out bundle.
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

from common.early_stopping import EarlyStopping
from llmrec.metrics import evaluate_matrices
from llmrec.options import EASE_LAMBDAS

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
    DEFAULT_LAMBDAS = EASE_LAMBDAS

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
        step, best_state, stopping = 0, None, EarlyStopping(self.patience)
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
            if stopping.update(score, epoch):
                best_state = copy.deepcopy(self.net.state_dict())
            elif stopping.stop:
                break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.fit_info = {
            "best_epoch": stopping.best_at if valid is not None else self.epochs,
            "epochs_run": epoch,
            "updates": step,
            "anneal_steps": anneal_steps,
            "final_beta": beta,
            f"valid_{SELECT_METRIC}": stopping.best if valid is not None else math.nan,
        }
        logger.info("Mult-VAE: %s", self.fit_info)

    @torch.no_grad()
    def _score(self, history: sp.csr_matrix) -> np.ndarray:
        self.net.eval()
        logits, _, _ = self.net(self._rows(history))
        return logits.float().cpu().numpy()


def sequence_matrix(sequences: Sequence[Sequence[int]], n_items: int) -> sp.csr_matrix:
    """The binary (len(sequences), n_items) matrix of the items in each sequence."""
    lengths = [len(items) for items in sequences]
    items = np.fromiter((i for seq in sequences for i in seq), dtype=np.int64, count=sum(lengths))
    users = np.repeat(np.arange(len(sequences)), lengths)
    return binarize(
        sp.csr_matrix((np.ones(len(items), np.float32), (users, items)), shape=(len(sequences), n_items))
    )


class SASRecNet(nn.Module):
    """SASRec's network (Kang & McAuley, 2018): item + position embeddings, causal self-attention blocks.

    Item ``i`` is token ``i + 1`` (0 pads, on the left, so the last position is the latest item); the
    output layer is the item embedding table itself, as in the paper. Pre-norm blocks (``norm_first``,
    as the paper's code) from torch's own ``TransformerEncoderLayer``, with a layer norm on the input
    embeddings (as RecBole's) and at the output. Weights start as BERT's and RecBole's do: N(0, 0.02),
    zero biases, the padding row zero. torch's default N(0, 1) embeddings make the tied output layer's
    logits ~sqrt(hidden) wide at the start, which the model takes many epochs to unlearn.
    """

    INIT_STD = 0.02

    def __init__(
        self,
        n_items: int,
        max_len: int,
        hidden: int = 64,
        heads: int = 1,
        blocks: int = 2,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.item = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.position = nn.Embedding(max_len, hidden)
        self.input_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, 4 * hidden, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        for name, param in self.named_parameters():
            if "norm" not in name:  # layer norms keep their (1, 0) start
                nn.init.normal_(param, std=self.INIT_STD) if param.dim() > 1 else nn.init.zeros_(param)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Boolean (batch * heads, time, time) mask, True where attention is blocked: the future and the
        padding. Every position may attend to itself, so a padding row is never all blocked (NaN)."""
        length = tokens.shape[1]
        future = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)
        blocked = future | (tokens == 0).unsqueeze(1)
        blocked &= ~torch.eye(length, dtype=torch.bool, device=tokens.device)
        return blocked.repeat_interleave(self.heads, dim=0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states (batch, time, hidden) of left-padded item tokens (batch, time)."""
        length = tokens.shape[1]
        real = (tokens > 0).unsqueeze(-1)
        x = self.input_norm(self.item(tokens) + self.position.weight[-length:])
        x = self.dropout(x) * real  # padding stays zero, as in the paper
        return self.norm(self.blocks(x, mask=self.attention_mask(tokens))) * real

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every item (..., n_items) from hidden states (..., hidden)."""
        return hidden @ self.item.weight[1:].T


class SASRec:
    """SASRec next-item recommender with a full-softmax cross-entropy over the catalogue.

    Trained on every position of each user's chronological training sequence (the last ``max_len``
    items, or with ``windows`` every ``max_len`` window of it); the paper's one sampled negative with
    binary cross-entropy is replaced by the full softmax, which is stronger and what recent
    reproductions use (Klenitskiy & Vasilev, 2023). Hyper-parameters are chosen on ``valid`` by NDCG@10
    with the training items excluded: the epoch by early stopping (``patience`` epochs without gain) and
    the dropout from ``dropouts``. Seeded: the same seed gives the same weights on CPU.

    Unlike the matrix baselines it reads *ordered* sequences: ``fit(sequences, n_items, valid)`` keeps
    them as the history ``score(users)`` reads, and ``score_rows(sequences)`` scores other ones
    (``sequences[u]`` is user u's items, oldest first).
    """

    name = "sasrec"
    SELECT = "ndcg@10"

    def __init__(
        self,
        max_len: int = 200,
        hidden: int = 64,
        heads: int = 1,
        blocks: int = 2,
        dropouts: Sequence[float] = (0.2, 0.5),
        epochs: int = 200,
        batch_size: int = 128,
        lr: float = 1e-3,
        patience: int = 10,
        seed: int = 0,
        device: str | None = None,
        progress: bool = False,
        windows: bool = False,
    ) -> None:
        if max_len < 1 or epochs < 1 or batch_size < 1 or not dropouts:
            raise ValueError(
                f"SASRec needs max_len, epochs, batch_size >= 1 and a dropout; got {max_len}, {epochs}, {batch_size}, {list(dropouts)}"
            )
        self.max_len, self.hidden, self.heads, self.blocks = max_len, hidden, heads, blocks
        self.dropouts, self.epochs, self.batch_size, self.lr = tuple(dropouts), epochs, batch_size, lr
        self.patience, self.seed, self.progress, self.windows = patience, seed, progress, windows
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.fit_info: dict[str, Any] = {}
        self.n_items: int | None = None

    def _tokens(self, sequences: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
        """Left-padded tokens (item + 1) of the last ``max_len`` items of each sequence."""
        width = width or self.max_len
        out = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, items in enumerate(sequences):
            tail = list(items)[-width:]
            if tail:
                out[row, width - len(tail) :] = torch.as_tensor(tail, dtype=torch.long) + 1
        return out.to(self.device)

    def fit(
        self, sequences: Sequence[Sequence[int]], n_items: int, valid: sp.spmatrix | None = None
    ) -> SASRec:
        """Train on ``sequences`` (each user's training items, oldest first); select on ``valid`` when given."""
        if valid is None and len(self.dropouts) > 1:
            raise ValueError("SASRec.fit needs valid to choose among several dropouts, or a single dropout")
        self.n_items = n_items
        self._sequences = [list(items) for items in sequences]
        seen = sequence_matrix(self._sequences, n_items)
        best, grid = None, {}
        for dropout in self.dropouts:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                net = SASRecNet(n_items, self.max_len, self.hidden, self.heads, self.blocks, dropout)
                self.net = net.to(self.device)
                info = self._train(valid, seen)
            grid[dropout] = info
            logger.info("SASRec dropout=%g: %s", dropout, info)
            if best is None or info[f"valid_{self.SELECT}"] > best[1][f"valid_{self.SELECT}"]:
                best = (dropout, info, copy.deepcopy(self.net.state_dict()))
        dropout, info, state = best
        self.net = SASRecNet(n_items, self.max_len, self.hidden, self.heads, self.blocks, dropout).to(
            self.device
        )
        self.net.load_state_dict(state)
        self.fit_info = {"dropout": dropout, **info, "grid": grid}
        return self

    def _train(self, valid: sp.spmatrix | None, seen: sp.csr_matrix) -> dict[str, Any]:
        windows = [window for items in self._sequences for window in self._windows(items)]
        inputs = self._tokens([window[:-1] for window in windows])
        targets = self._tokens([window[1:] for window in windows]) - 1  # -1 = padding
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr, betas=(0.9, 0.98))
        rng = np.random.default_rng(self.seed)
        best_state, curve, stopping = None, [], EarlyStopping(self.patience)
        epochs = tqdm(range(1, self.epochs + 1), desc="SASRec", unit="epoch", disable=not self.progress)
        for epoch in epochs:
            self.net.train()
            order = rng.permutation(len(windows))
            for start in range(0, len(order), self.batch_size):
                rows = torch.as_tensor(order[start : start + self.batch_size], device=self.device)
                x, y = inputs[rows], targets[rows]
                keep = (y >= 0).any(dim=0).nonzero()[0, 0]  # drop the columns that are padding in every row
                x, y = x[:, keep:], y[:, keep:]
                hidden = self.net(x)
                mask = y >= 0
                loss = F.cross_entropy(self.net.logits(hidden[mask]), y[mask])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if valid is None:
                continue
            score = self._valid(valid, seen)
            curve.append(score)
            if stopping.update(score, epoch):
                best_state = copy.deepcopy(self.net.state_dict())
            elif stopping.stop:
                break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        return {
            "best_epoch": stopping.best_at if valid is not None else self.epochs,
            "epochs_run": epoch,
            f"valid_{self.SELECT}": stopping.best if valid is not None else math.nan,
            f"valid_{self.SELECT}_by_epoch": curve,
        }

    def _windows(self, items: list[int]) -> list[list[int]]:
        """The training rows of one sequence: its newest ``max_len`` + 1 items, or with ``windows`` every
        such window back to its start, so that every item but the first is a target once per epoch."""
        ends = range(len(items), 1, -self.max_len) if self.windows else [len(items)] * (len(items) >= 2)
        return [items[:end] for end in ends]

    def _valid(self, valid: sp.spmatrix, seen: sp.csr_matrix) -> float:
        result = evaluate_matrices(self, valid, seen, batch_size=1024, ks=(10,))
        return result[self.SELECT]

    def score(self, users: np.ndarray) -> np.ndarray:
        """Dense (len(users), n_items) float32 scores of the item after each user's training sequence."""
        if self.n_items is None:
            raise RuntimeError("SASRec.score called before fit")
        return self.score_rows([self._sequences[int(u)] for u in users])

    @torch.no_grad()
    def score_rows(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Dense (len(sequences), n_items) float32 scores of the item after each sequence."""
        if self.n_items is None:
            raise RuntimeError("SASRec.score_rows called before fit")
        self.net.eval()
        tokens = self._tokens(sequences)
        hidden = self.net(tokens)[:, -1]
        return self.net.logits(hidden).float().cpu().numpy()


class Random(Baseline):
    """Uniform random scores, seeded: the floor every ranking must clear."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def _fit(self, train: sp.csr_matrix, valid: sp.spmatrix | None) -> None:
        self.rng = np.random.default_rng(self.seed)

    def _score(self, history: sp.csr_matrix) -> np.ndarray:
        return self.rng.random((history.shape[0], self.n_items), dtype=np.float32)


class ContentKNN(Baseline):
    """Cosine between a user's profile (the mean embedding of their history's items) and every item's
    text embedding. Needs no interaction with an item to score it, so it ranks unseen items too."""

    name = "knn"

    def __init__(self, embeddings: np.ndarray) -> None:
        super().__init__()
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        self.embeddings = (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)

    def _fit(self, train: sp.csr_matrix, valid: sp.spmatrix | None) -> None:
        if train.shape[1] != len(self.embeddings):
            raise ValueError(f"{len(self.embeddings)} item embeddings for {train.shape[1]} items")

    def _score(self, history: sp.csr_matrix) -> np.ndarray:
        profile = np.asarray(history @ self.embeddings)
        profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-12)
        return profile @ self.embeddings.T


# what each model can say about an item with no training interaction (cold-items splits)
UNSEEN_ITEMS = {
    "pop": "no signal for unseen items (popularity 0: they rank by index)",
    "ease": "cannot score unseen items",
    "multvae": "cannot score unseen items",
}

BASELINES: dict[str, type] = {cls.name: cls for cls in (Pop, EASE, MultVAE, SASRec, Random, ContentKNN)}


def make_baseline(name: str, **kwargs: Any) -> Baseline | SASRec:
    """Instantiate a baseline by its name ("pop", "ease", "multvae", "sasrec", "random", "knn")."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}") from None
    return cls(**kwargs)
