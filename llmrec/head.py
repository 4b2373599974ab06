"""The item head: how a hidden state and a user's history become a score for every catalogue item.

:class:`ItemHead` is one module, built from the model config, that owns every choice the head's options
make (`ModelConfig.head`, ``history_pool``, ``prior``, ``prior_weight``) and the state they bring:

- rows: ``tied`` scores with the collaborative item table, which the caller passes in (it belongs to
  the model's `llmrec.tokens.RecEmbedding` and grows with it); ``untied`` has rows of its own
  (``weight``, started from that table) and a ``bias`` (popularity).
- the history pool (``history_pool="mean"``): the head input is the hidden state plus a learned
  ``pool_scale`` times the RMS-normalised sum of the history items' collaborative rows; the identity
  when off.
- the prior (``prior="ease"``): an :class:`ItemItemPrior` (EASE's item-item matrix, fitted on the
  training matrix by `llmrec.pipeline.fit_prior`) blended into the scores as z(LM logits) + w * z(prior
  scores); its blend weight w is the buffer ``prior_weight``, saved with the weights (started from the
  config's ``prior_weight``, chosen on valid by :meth:`ItemHead.choose_prior_weight`).

Everything else asks the head (:attr:`ItemHead.untied`, :attr:`~ItemHead.pooled`,
:attr:`~ItemHead.has_prior`, :attr:`~ItemHead.linear`) and never compares the option strings;
``tests/test_head.py`` checks that.

Saved names are ``head.weight``, ``head.bias``, ``head.pool_scale``, ``head.prior.matrix`` and
``head.prior_weight`` inside a `llmrec.model.CLLM4Rec`; :meth:`ItemHead.upgrade_state_dict` reads the
names of model directories, checkpoints and bundles written before the head was a module
(``head_weight``, ``head_bias``, ``pool_scale``, ``prior.matrix``, the blend weight in the config).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from llmrec.options import HEADS, HISTORY_POOLS, PRIORS, ModelConfig

# the blend weights finetuning tries on valid (llmrec.pipeline.choose_prior_weight)
PRIOR_WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0)
# the head's tensors as CLLM4Rec named them before the head was a module -> their names in the head
LEGACY_NAMES = {
    "head_weight": "weight",
    "head_bias": "bias",
    "pool_scale": "pool_scale",
    "prior.matrix": "prior.matrix",
}


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Per-row z-scores over the catalogue (rows with no spread become 0)."""
    centred = scores - scores.mean(dim=-1, keepdim=True)
    return centred / centred.std(dim=-1, keepdim=True).clamp(min=1e-8)


def blend_scores(logits: torch.Tensor, prior: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """The item head's scores with a prior: z(LM logits) + weight * z(prior scores), per user."""
    return standardize(logits) + weight * standardize(prior)


class ItemItemPrior(nn.Module):
    """A frozen linear item-item scorer ``prior(x) = x @ W`` over a user's 0/1 history row (EASE's B).

    Finetuning fits ``W`` on the training matrix (`llmrec.baselines.EASE`, lambda chosen on valid). ``W``
    is a buffer saved with the model, so a run's evaluation, an export bundle and `Recommender` compute
    the same scores. The dense (n_items, n_items) matrix suits catalogues up to some tens of thousands
    of items.
    """

    def __init__(self, n_items: int):
        super().__init__()
        self.register_buffer("matrix", torch.zeros(n_items, n_items))

    def fit(self, matrix: torch.Tensor | np.ndarray) -> None:
        matrix = torch.as_tensor(np.asarray(matrix), dtype=self.matrix.dtype)
        if matrix.shape != self.matrix.shape:
            raise ValueError(
                f"prior matrix has shape {tuple(matrix.shape)}, expected {tuple(self.matrix.shape)}"
            )
        self.matrix.copy_(matrix)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        return bag.to(self.matrix.dtype) @ self.matrix

    def of_items(self, items: Sequence[Sequence[int]]) -> torch.Tensor:
        """``forward`` of the 0/1 bags of ``items`` (one list per row), summing the rows of ``W`` the bags
        select: history length x n_items work per row instead of a dense n_items x n_items product."""
        unique = [torch.as_tensor(np.unique(np.asarray(row, dtype=np.int64))) for row in items]
        rows = torch.repeat_interleave(torch.arange(len(unique)), torch.tensor([len(u) for u in unique]))
        device = self.matrix.device
        out = self.matrix.new_zeros(len(unique), self.matrix.shape[1])
        selected = self.matrix.index_select(0, torch.cat(unique).to(device))
        return out.index_add_(0, rows.to(device), selected)

    def grown(self, n_new: int) -> ItemItemPrior:
        """This prior over ``n_new`` more items, which neither add to nor receive prior scores (zero rows
        and columns)."""
        n_items = self.matrix.shape[0]
        prior = ItemItemPrior(n_items + n_new).to(self.matrix)
        prior.matrix[:n_items, :n_items] = self.matrix
        return prior


class ItemHead(nn.Module):
    """The item head of `llmrec.model.CLLM4Rec`: rows (tied or untied, with bias), history pool, prior
    and its blend weight, built from a `ModelConfig` over the collaborative item ``table`` (n_items,
    hidden).

    The operations take the collaborative item table as an argument (the tied head's rows and the pool's
    embeddings): it is the model's, and :func:`llmrec.mapper.extend_items` replaces it when the catalogue
    grows. The parts a config does not ask for are ``None``.
    """

    def __init__(self, config: ModelConfig, table: torch.Tensor):
        super().__init__()
        self.kind, self.pool_kind, self.prior_kind = "tied", "none", "none"
        # plain attributes until a part is added, so parameters register in the order they are added
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        self.pool_scale: nn.Parameter | None = None
        self.prior: ItemItemPrior | None = None
        self.register_buffer("prior_weight", None)  # a tensor with the prior (buffers have no order to keep)
        self._check(config)
        self._add_parts(config, table)

    # ------------------------------------------------------------------ what the head is
    @property
    def untied(self) -> bool:
        """Whether the head has rows and a bias of its own (else it scores with the passed-in table)."""
        return self.weight is not None

    @property
    def pooled(self) -> bool:
        """Whether the head input adds the pooled history (so callers compute the history bag)."""
        return self.pool_scale is not None

    @property
    def has_prior(self) -> bool:
        """Whether scores blend in an item-item prior (so callers pass the prior's scores)."""
        return self.prior is not None

    @property
    def linear(self) -> bool:
        """Whether scores are ``hidden @ weight.T + bias`` alone (no pool, no prior): what a plain
        transformers model with an item head can carry (`llmrec.export`, ``--merge``)."""
        return not self.pooled and not self.has_prior

    @property
    def blend_weight(self) -> float:
        """The prior's blend weight (0 without a prior)."""
        return 0.0 if self.prior_weight is None else float(self.prior_weight)

    def extra_repr(self) -> str:
        return f"head={self.kind}, history_pool={self.pool_kind}, prior={self.prior_kind}"

    # ------------------------------------------------------------------ building
    def _check(self, config: ModelConfig) -> None:
        if config.head not in HEADS:
            raise ValueError(f"unknown head {config.head!r}: expected 'tied' or 'untied'")
        if config.history_pool not in HISTORY_POOLS:
            raise ValueError(f"unknown history_pool {config.history_pool!r}: expected one of {HISTORY_POOLS}")
        if config.prior not in PRIORS:
            raise ValueError(f"unknown prior {config.prior!r}: expected one of {PRIORS}")

    def _add_parts(self, config: ModelConfig, table: torch.Tensor) -> None:
        """Add the parts ``config`` asks for that the head lacks: untied rows and bias (started from the
        table, bias zero), the pool's scale (one), the prior (zero matrix, blend weight from the config)."""
        device = table.device
        if config.head == "untied" and self.weight is None:
            self.weight = nn.Parameter(table.detach().clone())
            self.bias = nn.Parameter(torch.zeros(table.shape[0], device=device))
        if config.history_pool == "mean" and self.pool_scale is None:
            self.pool_scale = nn.Parameter(torch.ones((), device=device))
        if config.prior != "none" and self.prior is None:
            self.prior = ItemItemPrior(table.shape[0]).to(device)
            # float64, so that the weight reads back as chosen (0.15, not 0.15000000596); the blend
            # multiplies in the scores' float32 either way
            weight = torch.tensor(float(config.prior_weight), dtype=torch.float64, device=device)
            self.register_buffer("prior_weight", weight)
        self.kind, self.pool_kind, self.prior_kind = config.head, config.history_pool, config.prior

    def reconfigure(self, config: ModelConfig, table: torch.Tensor) -> None:
        """Take ``config``'s head options where the trained state stays valid: tied -> untied (the rows
        start from ``table``), and adding the pool or the prior; any other change raises. The blend
        weight is left as it is (:meth:`set_prior_weight` changes it)."""
        self._check(config)
        if config.head != self.kind and (self.kind, config.head) != ("tied", "untied"):
            raise ValueError(f"cannot change the item head from {self.kind!r} to {config.head!r}")
        for name, old, new in (
            ("history_pool", self.pool_kind, config.history_pool),
            ("prior", self.prior_kind, config.prior),
        ):
            if old != new and old != "none":
                raise ValueError(f"cannot change {name} from {old!r} to {new!r}")
        self._add_parts(config, table)

    # ------------------------------------------------------------------ scoring
    def product(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (n_items, hidden), bias (n_items) or None) of the head's linear part: the item
        softmax's arguments (`llmrec.losses.ItemSoftmax`)."""
        return (self.weight, self.bias) if self.untied else (table, None)

    def logits(self, hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Scores of every catalogue item from head inputs (..., hidden) -> (..., n_items), before any prior."""
        weight, bias = self.product(table)
        logits = hidden.to(weight.dtype) @ weight.T
        if bias is not None:
            logits = logits + bias
        return logits

    def pool(self, state: torch.Tensor, bag: torch.Tensor | None, table: torch.Tensor) -> torch.Tensor:
        """The head input from the prompt's last hidden ``state`` (batch, hidden) and the 0/1 ``bag``
        (batch, n_items) of the history's items: ``state`` plus the pooled bag; ``state`` itself when
        the pool is off (``bag`` may then be None)."""
        if not self.pooled:
            return state
        return self.add_pooled(state, bag.to(table.dtype) @ table)

    def add_pooled(self, state: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """``state`` plus the learned scale times the RMS-normalised ``pooled`` sum of history item rows
        (normalised like the decoder's output, so both paths start at the same scale); ``state`` itself
        when the pool is off."""
        if not self.pooled:
            return state
        pooled = pooled.to(state.dtype)
        pooled = pooled * torch.rsqrt(pooled.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return state + self.pool_scale * pooled

    def prior_scores(self, bag: torch.Tensor) -> torch.Tensor | None:
        """The prior's scores (batch, n_items) of the 0/1 history ``bag``; None without a prior."""
        return None if self.prior is None else self.prior(bag)

    def prior_of_items(self, items: Sequence[Sequence[int]]) -> torch.Tensor | None:
        """:meth:`prior_scores` of histories given as item lists (`ItemItemPrior.of_items`); None without
        a prior."""
        return None if self.prior is None else self.prior.of_items(items)

    def blend(self, logits: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """Float LM ``logits`` with the ``prior``'s scores blended in at the head's weight; the logits
        themselves without a prior."""
        if self.prior is None:
            return logits
        return blend_scores(logits, prior, self.prior_weight)

    def scores(self, state: torch.Tensor, table: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """(batch, n_items) ranking scores from head inputs (:meth:`pool`'s) and, with a prior, its
        scores of the histories (:meth:`prior_scores`)."""
        return self.blend(self.logits(state, table).float(), prior)

    # ------------------------------------------------------------------ the prior
    def _require_prior(self) -> ItemItemPrior:
        if self.prior is None:
            raise ValueError("this item head has no prior (prior: none)")
        return self.prior

    def fit_prior(self, matrix: torch.Tensor | np.ndarray) -> None:
        """Set the prior's item-item matrix (n_items, n_items): EASE's weights (`llmrec.pipeline.fit_prior`)."""
        self._require_prior().fit(matrix)

    def set_prior_weight(self, weight: float) -> None:
        """Blend the prior at ``weight`` from now on (saved with the weights)."""
        self._require_prior()
        self.prior_weight.fill_(float(weight))

    def choose_prior_weight(
        self,
        logits: torch.Tensor,
        prior: torch.Tensor,
        score: Callable[[torch.Tensor], float],
        weights: Sequence[float] = PRIOR_WEIGHTS,
    ) -> tuple[float, dict[float, float]]:
        """The blend weight whose blended scores of ``logits`` and ``prior`` (float (users, n_items), from
        `llmrec.scoring.ItemHeadScorer.parts`) ``score`` highest (e.g. a valid metric), set on the head;
        returns it and every weight's score (the first best weight wins a tie)."""
        self._require_prior()
        grid = {weight: score(blend_scores(logits, prior, weight)) for weight in weights}
        best = max(grid, key=grid.get)
        self.set_prior_weight(best)
        return best, grid

    # ------------------------------------------------------------------ item rows (cold start)
    def rows(self, table: torch.Tensor) -> torch.Tensor:
        """The rows the head owns per item, (n_items, :meth:`width`) in float: ``[weight | bias]`` for an
        untied head, no columns for a tied one (its rows are the collaborative ``table``'s)."""
        if not self.untied:
            return table.detach().float().new_zeros(table.shape[0], 0)
        return torch.cat([self.weight.detach().float(), self.bias.detach().float()[:, None]], dim=1)

    def width(self) -> int:
        """Columns of :meth:`rows`: hidden + 1 untied, 0 tied."""
        return self.weight.shape[1] + 1 if self.untied else 0

    @torch.no_grad()
    def set_rows(self, items: torch.Tensor, rows: torch.Tensor) -> None:
        """Write ``rows`` (len(items), :meth:`width`), laid out as :meth:`rows`, for the item indices
        ``items``; nothing for a tied head."""
        if not self.untied:
            return
        hidden = self.weight.shape[1]
        self.weight[items.to(self.weight.device)] = rows[:, :hidden].to(self.weight)
        self.bias[items.to(self.bias.device)] = rows[:, -1].to(self.bias)

    def rows_like(self, embedding: torch.Tensor, warm_rows: torch.Tensor) -> torch.Tensor:
        """The head's rows (len(embedding), :meth:`width`) of new items whose every embedding is
        ``embedding`` (the identity relation of `llmrec.coldstart.relate`): that embedding as the untied
        row, and the mean bias of ``warm_rows`` (:meth:`rows` of warm items) as the bias."""
        if not self.untied:
            return embedding.new_zeros(len(embedding), 0)
        return torch.cat([embedding, warm_rows[:, -1:].mean(0).expand(len(embedding), 1)], dim=1)

    @torch.no_grad()
    def grow(self, n_new: int) -> None:
        """``n_new`` more items (`llmrec.mapper.extend_items`): zero untied rows and biases, zero prior
        rows and columns; the old items' scores do not change."""
        if self.untied:
            self.weight = nn.Parameter(
                torch.cat([self.weight, self.weight.new_zeros(n_new, self.weight.shape[1])])
            )
            self.bias = nn.Parameter(torch.cat([self.bias, self.bias.new_zeros(n_new)]))
        if self.prior is not None:
            self.prior = self.prior.grown(n_new)

    # ------------------------------------------------------------------ saved weights
    def upgrade_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """Saved trainable weights with the head's tensors under this head's names (``prefix`` + name):
        files written before the head was a module name them ``head_weight``, ``head_bias``,
        ``pool_scale`` and ``prior.matrix``, and keep the blend weight in the model config, from which
        this head was built (so its ``prior_weight`` is taken as it is). Other files pass unchanged."""
        if not any(name in state for name in LEGACY_NAMES):
            return dict(state)
        upgraded = {
            prefix + LEGACY_NAMES[name] if name in LEGACY_NAMES else name: tensor
            for name, tensor in state.items()
        }
        if "prior.matrix" in state and self.prior_weight is not None:
            upgraded[prefix + "prior_weight"] = self.prior_weight.detach().clone()
        return upgraded
