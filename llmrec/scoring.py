"""The item head as a scorer: prompts with all of a user's training items -> scores of the whole catalogue.

Every scorer in the project (this one, `llmrec.decoding.GenerativeScorer`, `llmrec.zeroshot.ZeroShotScorer`,
the `llmrec.baselines`) has one method, ``score(users) -> (batch, n_items)`` (`llmrec.metrics.Scorer`),
so evaluation and serving treat them alike.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmrec.backbone import KV, cache_kv, kv_cache
from llmrec.metrics import SplitSource, evaluate_scorer, with_selection_metric
from llmrec.model import CLLM4Rec, last_position
from llmrec.prompts import FinetunePrompts, pad, prompt_batch


class ItemHeadScorer:
    """Scores the whole catalogue for users from prompts that hold all their training items.

    One forward pass per user (batched): the hidden state at the prompt's last position goes through the
    item head. Users are processed in the order given; callers exclude seen items themselves.
    """

    def __init__(
        self,
        model: CLLM4Rec,
        prompts: FinetunePrompts,
        histories: Sequence[Sequence[int]],
        batch_size: int = 32,
    ):
        self.model, self.prompts, self.histories, self.batch_size = model, prompts, histories, batch_size
        self.n_items = model.vocab.n_items
        self.device = next(p for p in model.parameters() if p.requires_grad).device

    def batches(self, users: Sequence[int] | np.ndarray) -> Iterator[tuple[torch.Tensor, ...]]:
        """(input_ids, attention_mask, history) of the users' prompts, ``batch_size`` users at a time;
        ``history`` holds every history item (padded with -1), also those a long prompt leaves out."""
        for start in range(0, len(users), self.batch_size):
            chunk = [int(u) for u in users[start : start + self.batch_size]]
            yield self.batch(chunk, [self.prompts.encode(u, self.histories[u]) for u in chunk])

    def batch(self, users: Sequence[int], prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
        """(input_ids, attention_mask, history) on the model's device for ``users`` and their prompt ids."""
        batch = prompt_batch(prompts, pad_token_id=self.model.tokenizer.pad_token_id or 0)
        history = pad([list(self.histories[u]) for u in users], -1)
        return (
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            history.to(self.device),
        )

    @torch.no_grad()
    def score(self, users: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(len(users), n_items) scores on the CPU; ``users`` index ``histories``."""
        self.model.eval()
        return torch.cat([self.model.score_items(*batch).cpu() for batch in self.batches(users)])

    @torch.no_grad()
    def parts(self, users: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM logits, prior scores) of the users, unblended (see `CLLM4Rec.score_parts`)."""
        self.model.eval()
        pairs = [tuple(t.cpu() for t in self.model.score_parts(*batch)) for batch in self.batches(users)]
        return torch.cat([lm for lm, _ in pairs]), torch.cat([prior for _, prior in pairs])


@dataclass
class PromptKV:
    """The keys and values of a user's prompt ids ``tokens`` (up to its last history item)."""

    tokens: list[int]
    kv: KV

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


class UserStates(ItemHeadScorer):
    """Known users' item-head inputs, computed once per user, so that scoring a user costs one head
    product (plus the prior over their history, with ``prior: ease``) instead of a forward pass.

    A state is `CLLM4Rec.last_hidden` of the user's prompt (the pooled history included); scores are
    `CLLM4Rec.head_scores` of it, equal to :class:`ItemHeadScorer`'s. States are computed on first use
    or by :meth:`warm`. :meth:`update` appends items to a history and runs only the new tokens through
    the LM on top of the prompt's cached keys and values. Memory is bounded and explicit: the states
    take ``n_users x hidden`` floats (ML-100K on SmolLM2-135M: 943 x 576 x 4 B = 2.2 MB); the keys and
    values of at most ``kv_users`` prompts (the most recently computed) are kept, each
    ``2 x layers x kv_heads x head_dim x prompt tokens`` floats (SmolLM2-135M, 128 tokens, fp32: 5.9 MB;
    its 2-layer cut: 0.4 MB); ``kv_users=0`` keeps none (every update recomputes the prompt). States
    stay valid while the weights and histories do: grow histories with :meth:`update` only, and call
    :meth:`clear` after changing weights; a grown catalogue (:meth:`grow`) keeps them.
    """

    def __init__(
        self,
        model: CLLM4Rec,
        prompts: FinetunePrompts,
        histories: list[Sequence[int]],
        batch_size: int = 32,
        kv_users: int = 32,
    ):
        super().__init__(model, prompts, histories, batch_size)
        if kv_users < 0:
            raise ValueError(f"kv_users must be >= 0, got {kv_users}")
        self.kv_users = kv_users
        self.clear()

    def clear(self) -> None:
        """Forget every state and cached prompt (needed after the model's weights change)."""
        self.states: torch.Tensor | None = None  # (n_users, hidden), allocated by the first state
        self.known = np.zeros(len(self.histories), dtype=bool)
        self.kv: OrderedDict[int, PromptKV] = OrderedDict()

    def grow(self, prompts: FinetunePrompts) -> None:
        """The catalogue grew (`llmrec.mapper.extend_items`): old items keep their rows and token ids and no
        history holds a new item, so states and cached prompts stay valid; the head product scores the
        new items too."""
        self.prompts, self.n_items = prompts, self.model.vocab.n_items

    @property
    def nbytes(self) -> int:
        """Bytes held by the states and the cached keys and values."""
        held = 0 if self.states is None else self.states.nbytes
        return held + sum(entry.nbytes for entry in self.kv.values())

    @torch.no_grad()
    def score(self, users: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(len(users), n_items) scores on the CPU, from the states (computed first where missing)."""
        users = np.asarray(users, dtype=np.int64)
        self.warm(users)
        out = []
        for start in range(0, len(users), self.batch_size):
            chunk = users[start : start + self.batch_size]
            prior = self.model.head.prior_of_items([self.histories[u] for u in chunk])  # None: no prior
            index = torch.as_tensor(chunk, device=self.states.device)
            out.append(self.model.head_scores(self.states[index], prior).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def warm(self, users: Sequence[int] | np.ndarray | None = None, batch_size: int | None = None) -> None:
        """Compute the states of ``users`` (default: all) that have none, ``batch_size`` (default: the
        scorer's) prompts per pass; the prompts of the last ``kv_users`` of them keep their keys and values."""
        users = np.arange(len(self.histories)) if users is None else np.asarray(users, dtype=np.int64)
        missing = [int(u) for u in dict.fromkeys(users.tolist()) if not self.known[u]]
        if not missing:
            return
        keep = set(missing[max(0, len(missing) - self.kv_users) :]) if self.kv_users else set()
        self._eval()
        step = batch_size or self.batch_size
        for start in range(0, len(missing), step):
            self._compute(missing[start : start + step], keep)

    def _compute(self, users: list[int], keep: set[int]) -> None:
        parts = [self.prompts.encode_parts(u, self.histories[u]) for u in users]
        input_ids, mask, history = self.batch(users, [ids for ids, _ in parts])
        rows = [row for row, u in enumerate(users) if u in keep]
        if rows:
            hidden, cache = self.model.hidden_states_cached(input_ids, mask)
            kv = cache_kv(cache)
        else:
            hidden = self.model.hidden_states(input_ids, mask, "collab")
        self._store(users, self._head_input(last_position(hidden, mask), history))
        for row in rows:
            ids, end = parts[row]
            # clone: a slice would keep the whole batch's keys and values alive
            pairs = [(k[row : row + 1, :, :end].clone(), v[row : row + 1, :, :end].clone()) for k, v in kv]
            self._keep(users[row], PromptKV(ids[:end], pairs))

    @torch.no_grad()
    def update(self, user: int, items: Sequence[int]) -> bool:
        """Append ``items`` to ``user``'s history (in place) and refresh their state.

        Only the tokens after the cached prompt run through the LM (on its keys and values) when the
        user's prompt is cached and the grown prompt starts with it. Otherwise the whole grown prompt is
        recomputed: when the user's prompt is not cached (never scored, evicted, ``kv_users=0``), when
        truncation to ``max_doc_tokens`` drops old items (the prompt's start changes), or when the
        template's text before ``{history}`` does not encode as the prompt's start. Returns whether the
        incremental step was taken.
        """
        self._eval()
        grown = np.concatenate(
            [np.asarray(self.histories[user], dtype=np.int64), np.asarray(items, np.int64)]
        )
        self.histories[user] = grown
        ids, end = self.prompts.encode_parts(user, grown)
        cached = self.kv.pop(user, None)
        reuse = (
            cached is not None
            and len(cached.tokens) < len(ids)
            and ids[: len(cached.tokens)] == cached.tokens
        )
        start = len(cached.tokens) if reuse else 0
        hidden, cache = self.model.hidden_states_cached(
            torch.tensor([ids[start:]], device=self.device),
            torch.ones(1, len(ids), dtype=torch.long, device=self.device),
            cache=kv_cache(cached.kv) if reuse else None,
            position_ids=torch.arange(start, len(ids), device=self.device)[None],
        )
        history = torch.as_tensor(grown, device=self.device)[None]
        self._store([user], self._head_input(hidden[:, -1], history))
        if self.kv_users:
            pairs = [(k[:, :, :end], v[:, :, :end]) for k, v in cache_kv(cache)]
            self._keep(user, PromptKV(ids[:end], pairs))
        return reuse

    def _eval(self) -> None:
        if self.model.training:  # eval() walks every module: milliseconds, more than a cached score
            self.model.eval()

    def _head_input(self, state: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        bag = self.model.history_bag(None, None, history) if self.model.head.pooled else None
        return self.model.head_input(state, bag)

    def _store(self, users: list[int], states: torch.Tensor) -> None:
        if self.states is None:
            self.states = states.new_zeros(len(self.histories), states.shape[1])
        self.states[torch.as_tensor(users, device=self.states.device)] = states
        self.known[users] = True

    def _keep(self, user: int, entry: PromptKV) -> None:
        self.kv[user] = entry
        while len(self.kv) > self.kv_users:
            self.kv.popitem(last=False)


class PrecomputedScorer:
    """Scores computed once for a set of users (e.g. a blend of two scorers' outputs), served by user."""

    def __init__(self, scores: torch.Tensor, users: Sequence[int] | np.ndarray):
        self.scores, self.n_items = scores, scores.shape[1]
        self.row = {int(user): row for row, user in enumerate(users)}

    def score(self, users: Sequence[int] | np.ndarray) -> torch.Tensor:
        return self.scores[[self.row[int(u)] for u in users]]


def valid_metric(
    bundle: SplitSource, metric: str, batch_size: int = 64
) -> tuple[np.ndarray, Callable[[torch.Tensor], float]]:
    """The users with a valid item, and ``metric`` on valid of a (those users, n_items) score matrix: how a
    blend weight is chosen (the prior's, the fusion's), every candidate blend scored without a forward."""
    users = np.flatnonzero(np.diff(bundle.matrix("valid").indptr) > 0)

    def score(scores: torch.Tensor) -> float:
        blend = PrecomputedScorer(scores, users)
        result = evaluate_scorer(blend, bundle, "valid", users=users, batch_size=batch_size, progress=False)
        return with_selection_metric(result)[metric]

    return users, score
