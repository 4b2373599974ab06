"""Zero-shot recommendation: score every catalogue item by an untouched LM's likelihood of its title.

Following Sileo et al. ("Zero-Shot Recommendation as Language Modeling", ECIR 2022), a prompt is built
from the titles of the user's history (``"Movies like Toy Story (1995), Heat (1995), and"``, or a chat
instruction for instruct models) and each item is scored by ``log p(title | prompt)`` — the sum over the
title's tokens, or that sum divided by the number of tokens (length-normalised).

Tokenization choices (documented because they change the numbers):

* The prompt is tokenized on its own (with the tokenizer's BOS if it adds one); each candidate is the
  string ``item_prefix + title + item_suffix`` tokenized on its own, without special tokens, and its ids
  are appended to the prompt's. With the completion style the prefix is a single space, so ``"... and"`` +
  ``" Heat (1995),"`` splits at the word boundary exactly as BPE tokenizers split running text.
* The title's *end* is scored: the suffix (``","`` for the completion style, the end-of-turn/EOS token for
  the chat style) is part of the candidate, so ``"Heat"`` cannot win by being a prefix of
  ``"Heat (1995)"`` — the model must also predict that the title stops there.

Three exact scorers compute the same numbers at very different costs:

* :func:`score_naive` runs ``prompt + title`` from scratch for every item (the reference).
* :func:`score_cached` runs the prompt once and scores the titles in right-padded batches that attend
  to the prompt's KV cache.
* :func:`score_trie` runs the prompt once and computes each node of a token trie of all titles once
  (shared prefixes such as ``" Star Trek"`` are computed once, and a title's last token is never run).
  The trie is flattened in depth-first order and run in chunks with *tree attention*: a custom 4D
  attention mask lets each node attend to the prompt and to its own ancestors only, with
  ``position_ids`` = prompt length + depth - 1. In depth-first order every ancestor of a chunk's node
  that lies before the chunk is an ancestor of the chunk's first node, so only that one root-to-node path
  of KV (at most the longest title) is carried from chunk to chunk.

The cached scorer needs a model that takes a ``DynamicCache``; the trie scorers also need its attention to
honour a custom 4D mask and ``position_ids`` (Llama, Qwen2, SmolLM2, GPT-2 and most decoder-only models in
transformers v5; not sliding-window or recurrent layers when the prompt is longer than the window).
``score_naive`` works with any causal LM and is the check: the tests assert the three agree to 1e-4.

When only a ranking's head matters (Recall/NDCG@K), :func:`score_top_k` finds the exact top-k items by
total log-likelihood while running only the trie nodes that can still lead to one (branch and bound:
a title's total can only fall as tokens are added). Movie titles share few prefixes (ML-100K with the
SmolLM2 tokenizer: 17,782 title tokens, 16,684 trie nodes), so the trie saves little over the cached
scorer there, and the top-k search is what cuts the cost (``benchmarks/zeroshot_scoring.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from llmrec.backbone import cache_kv, kv_cache
from llmrec.options import EOS, NORMALIZATIONS, PromptConfig
from llmrec.options import ZEROSHOT_METHODS as METHODS
from llmrec.trie import Trie

logger = logging.getLogger(__name__)


def encode_items(
    titles: Sequence[str], tokenizer: PreTrainedTokenizerBase, prompt: PromptConfig
) -> list[list[int]]:
    """Token ids of every candidate (prefix + title + suffix), as they follow the prompt."""
    if prompt.item_suffix == EOS:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"item_suffix={EOS!r} but the tokenizer has no eos_token")
        texts, tail = [f"{prompt.item_prefix}{t}" for t in titles], [tokenizer.eos_token_id]
    else:
        texts, tail = [f"{prompt.item_prefix}{t}{prompt.item_suffix}" for t in titles], []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    items = [list(ids) + tail for ids in encoded]
    for index, ids in enumerate(items):
        if not ids:
            raise ValueError(f"item {index}: title {titles[index]!r} gives no tokens with this prompt config")
    return items


class PromptBuilder:
    """Turns a user's history (item indices, oldest first) into prompt token ids that fit the context."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        titles: Sequence[str],
        prompt: PromptConfig,
        max_prompt_tokens: int,
    ) -> None:
        if prompt.style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("PromptConfig.style='chat' but the tokenizer has no chat_template")
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.tokenizer, self.titles, self.config = tokenizer, titles, prompt
        self.max_prompt_tokens = max_prompt_tokens

    def text(self, history: Sequence[int]) -> str:
        """The prompt text for these history items (already selected and ordered)."""
        return self.render(self.config.separator.join(self.titles[i] for i in history))

    def render(self, history: str) -> str:
        """The prompt text with ``history`` where the history titles go."""
        if self.config.style == "completion":
            return self.config.template.format(history=history)
        message = {"role": "user", "content": self.config.instruction.format(history=history)}
        return self.tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=False)

    def neutral(self) -> list[int]:
        """Prompt ids with ``PromptConfig.neutral_history`` in place of a user's titles."""
        return self.encode_text(self.render(self.config.neutral_history))

    def encode_text(self, text: str) -> list[int]:
        # A chat template already spells out its special tokens; a completion prompt starts a document.
        add_special = self.config.style == "completion"
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def __call__(self, history: Sequence[int]) -> list[int]:
        """Keep the ``max_history`` most recent items, then drop the oldest until the prompt fits."""
        kept = list(history)[-self.config.max_history :]
        while True:
            ordered = kept[::-1] if self.config.recent_first else kept
            ids = self.encode_text(self.text(ordered))
            if len(ids) <= self.max_prompt_tokens:
                return ids
            if not kept:
                raise ValueError(
                    f"the prompt without history is {len(ids)} tokens, over max_prompt_tokens="
                    f"{self.max_prompt_tokens}"
                )
            kept = kept[1:]


@dataclass
class ItemLogLikelihoods:
    """``log p(item | prompt)`` summed over each item's tokens, the token counts, and the work done.

    The scorers run under ``no_grad`` rather than ``inference_mode`` so that these are plain tensors that
    callers may mask in place.
    """

    total: torch.Tensor  # (n_items,) float64; -inf for items a top-k search never reached
    lengths: torch.Tensor  # (n_items,) int64
    tokens_computed: int  # positions run through the model, padding included
    complete: bool = True  # False after a top-k search: only the best items are guaranteed scored

    def scores(self, normalize: str = "sum") -> torch.Tensor:
        """``"sum"``: total log-likelihood; ``"mean"``: per-token (length-normalised) log-likelihood."""
        if normalize == "sum":
            return self.total
        if normalize == "mean":
            if not self.complete:
                raise ValueError("length-normalised scores need every item scored; this was a top-k search")
            return self.total / self.lengths
        raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log-softmax(logits)[..., target] without materialising the full log-softmax."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)).double()


def _run_prompt(model: PreTrainedModel, prompt_ids: Sequence[int]) -> tuple[list, torch.Tensor]:
    """Run the prompt once: per-layer (keys, values) and log-probabilities of the next token."""
    ids = torch.tensor([list(prompt_ids)], device=_device(model))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    kv = cache_kv(out.cache)
    return kv, out.logits[0, -1].float().log_softmax(-1).double()


def _lengths(items: Sequence[Sequence[int]]) -> torch.Tensor:
    return torch.tensor([len(t) for t in items], dtype=torch.int64)


@torch.no_grad()
def score_naive(
    model: PreTrainedModel, prompt_ids: Sequence[int], items: Sequence[Sequence[int]]
) -> ItemLogLikelihoods:
    """Reference scorer: one full forward pass of ``prompt + item`` per item, no reuse of any kind."""
    device, p = _device(model), len(prompt_ids)
    total = torch.empty(len(items), dtype=torch.float64)
    tokens = 0
    for index, item in enumerate(items):
        seq = list(prompt_ids) + list(item[:-1])
        logits = model(input_ids=torch.tensor([seq], device=device), use_cache=False).logits[0, p - 1 :]
        total[index] = _target_logprobs(logits, torch.tensor(item, device=device)).sum().cpu()
        tokens += len(seq)
    return ItemLogLikelihoods(total, _lengths(items), tokens)


@torch.no_grad()
def score_cached(
    model: PreTrainedModel, prompt_ids: Sequence[int], items: Sequence[Sequence[int]], batch_size: int = 32
) -> ItemLogLikelihoods:
    """Run the prompt once, then score items in right-padded batches against its KV cache.

    Right padding needs no attention mask: with causal attention a real token never sees the padding
    after it. Items are sorted by length so that batches carry little padding.
    """
    device = _device(model)
    kv, first = _run_prompt(model, prompt_ids)
    total = torch.empty(len(items), dtype=torch.float64)
    tokens = len(prompt_ids)
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(items[i]) for i in batch)
        targets = torch.tensor([list(items[i]) + [0] * (width - len(items[i])) for i in batch], device=device)
        valid = torch.tensor([[j < len(items[i]) for j in range(width)] for i in batch], device=device)
        logp = first[targets[:, 0]].unsqueeze(1)
        if width > 1:
            out = model(input_ids=targets[:, :-1], cache=kv_cache(kv, len(batch)), use_cache=True)
            logp = torch.cat([logp, _target_logprobs(out.logits, targets[:, 1:])], dim=1)
            tokens += len(batch) * (width - 1)
        total[batch] = logp.masked_fill(~valid, 0.0).sum(1).cpu()
    return ItemLogLikelihoods(total, _lengths(items), tokens)


def _tree_forward(
    model: PreTrainedModel,
    prefix_kv: list,
    trie: Trie,
    n_prompt: int,
    context: np.ndarray,
    chunk: np.ndarray,
) -> tuple[DynamicCache, np.ndarray, np.ndarray]:
    """Run trie nodes ``chunk`` with tree attention; return the cache, their children and the children's log-probs.

    ``prefix_kv`` holds the prompt's KV followed by that of the ``context`` nodes, which must include every
    ancestor of the chunk's nodes that is not in the chunk. Each node attends to the prompt, to its ancestors
    (``a`` is an ancestor-or-self of ``n`` iff ``a <= n < end[a]`` in preorder) and to itself, at position
    prompt length + depth - 1, exactly as if its title were the only text after the prompt.
    """
    device, dtype = _device(model), prefix_kv[0][0].dtype
    keys = np.concatenate([context, chunk])
    allowed = (keys[None, :] <= chunk[:, None]) & (chunk[:, None] < trie.end[keys][None, :])
    mask = torch.zeros(len(chunk), n_prompt + len(keys), dtype=dtype)
    mask[:, n_prompt:].masked_fill_(torch.from_numpy(~allowed), torch.finfo(dtype).min)
    out = model(
        input_ids=torch.from_numpy(trie.token[chunk]).unsqueeze(0).to(device),
        position_ids=torch.from_numpy(n_prompt + trie.depth[chunk] - 1).unsqueeze(0).to(device),
        attention_mask=mask[None, None].to(device),
        cache=kv_cache(prefix_kv),
        use_cache=True,
    )
    kids, rows = trie.children(chunk)
    logits = out.logits[0, torch.from_numpy(rows).to(device)]
    logp = _target_logprobs(logits, torch.from_numpy(trie.token[kids]).to(device)).cpu().numpy()
    return out.cache, kids, logp


def _concat_kv(kv: list, extra: list) -> list:
    return [
        (torch.cat([k, ek], 2), torch.cat([v, ev], 2)) for (k, v), (ek, ev) in zip(kv, extra, strict=True)
    ]


def _select_kv(cache: DynamicCache | list, positions: np.ndarray) -> list:
    """Per-layer (keys, values) at sequence ``positions`` of a cache (or of a list of (keys, values))."""
    pairs = cache_kv(cache) if isinstance(cache, DynamicCache) else cache
    where = torch.from_numpy(positions).to(pairs[0][0].device)
    return [(k[:, :, where], v[:, :, where]) for k, v in pairs]


def _root_logprobs(trie: Trie, first: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    roots, _ = trie.children(np.zeros(1, dtype=np.int64))
    return roots, first[torch.from_numpy(trie.token[roots]).to(first.device)].cpu().numpy()


@torch.no_grad()
def score_trie(
    model: PreTrainedModel,
    prompt_ids: Sequence[int],
    trie: Trie,
    chunk_size: int = 256,
) -> ItemLogLikelihoods:
    """Run the prompt once, then each inner trie node once, ``chunk_size`` nodes per forward pass.

    Node ``n``'s log-probability comes from its parent's logits (the prompt's last logits for the
    root's children); an item's score is the sum along its root-to-terminal path. Chunks follow the
    preorder, so the only KV carried between chunks is the next chunk's first node's ancestor path.
    """
    p = len(prompt_ids)
    kv, first = _run_prompt(model, prompt_ids)
    logp = np.zeros(len(trie), dtype=np.float64)
    roots, root_logp = _root_logprobs(trie, first)
    logp[roots] = root_logp
    inner = trie.inner
    context = np.zeros(0, dtype=np.int64)  # the first inner node is a child of the root: no ancestors
    context_kv = _select_kv(kv, context)
    for start in range(0, len(inner), chunk_size):
        chunk = inner[start : start + chunk_size]
        cache, kids, kid_logp = _tree_forward(model, _concat_kv(kv, context_kv), trie, p, context, chunk)
        logp[kids] = kid_logp
        if start + chunk_size < len(inner):
            # The next first node's ancestors are all in `context` or in this chunk (preorder intervals).
            keys, nxt = np.concatenate([context, chunk]), trie.path(int(inner[start + chunk_size]))
            context, context_kv = nxt, _select_kv(cache, p + np.searchsorted(keys, nxt))
    total = torch.from_numpy(trie.path_sums(logp)[trie.terminal])
    return ItemLogLikelihoods(total, torch.from_numpy(trie.depth[trie.terminal]), p + len(inner))


@torch.no_grad()
def score_top_k(
    model: PreTrainedModel,
    prompt_ids: Sequence[int],
    trie: Trie,
    k: int,
    exclude: Sequence[int] | np.ndarray | None = None,
    chunk_size: int = 256,
    prior: np.ndarray | torch.Tensor | None = None,
) -> ItemLogLikelihoods:
    """Exact top-``k`` items by total log-likelihood plus ``prior`` (one score per item, e.g. a weighted
    log-popularity) without running every title to its end.

    Branch and bound: log-probabilities are <= 0, so an item's total is at most the total of any prefix of
    its tokens, and its score at most that plus the best prior of the items below the prefix. Trie nodes
    are expanded best-first (highest such bound), ``chunk_size`` per forward pass, with tree attention over
    the prompt and the stored KV of their ancestors. Once ``k`` allowed items (not in ``exclude``) score
    >= T, a node whose bound is below T cannot lead to a top-k item and is never run. Items that are
    reached get their exact total (equal to :func:`score_trie`'s, without the prior); the others get
    ``-inf``. The ``k`` best allowed items by total + prior, ties included, are always among the reached
    ones, so Recall/NDCG@K for K <= k are exactly those of full scoring. The sum variant only:
    length-normalised totals are not monotone along a title. A prior spread wide against the
    log-likelihoods loosens the bound, so the search then runs more of the trie.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p = len(prompt_ids)
    kv, first = _run_prompt(model, prompt_ids)
    allowed_items = np.ones(len(trie.terminal), dtype=bool)
    if exclude is not None:
        allowed_items[np.asarray(exclude, dtype=np.int64)] = False
    ends = trie.terminal[allowed_items]
    item_prior = np.zeros(len(ends)) if prior is None else np.asarray(prior, dtype=np.float64)[allowed_items]
    at_node = np.bincount(ends, minlength=len(trie))
    below = trie.subtree_sums(at_node) - at_node  # allowed items ending strictly below each node
    best_prior = np.full(len(trie), -np.inf)
    np.maximum.at(best_prior, ends, item_prior)
    best_prior = trie.subtree_max(best_prior)  # finite wherever `below` > 0
    total = np.full(len(trie), -np.inf)
    roots, root_logp = _root_logprobs(trie, first)
    total[roots] = root_logp
    pending = np.zeros(len(trie), dtype=bool)  # reached, not yet run, with allowed items below
    pending[roots] = below[roots] > 0
    slot = np.full(len(trie), -1, dtype=np.int64)  # where a run node's KV sits in `store`
    store = _select_kv(kv, np.zeros(0, dtype=np.int64))
    tokens = p
    while True:
        reached = total[ends] + item_prior
        bound = np.partition(reached, len(reached) - k)[len(reached) - k] if len(reached) >= k else -np.inf
        candidates = np.flatnonzero(pending)
        optimistic = total[candidates] + best_prior[candidates]
        candidates, optimistic = candidates[optimistic >= bound], optimistic[optimistic >= bound]
        if len(candidates) == 0:
            break
        if len(candidates) > chunk_size:
            candidates = candidates[np.argpartition(-optimistic, chunk_size - 1)[:chunk_size]]
        chunk = np.sort(candidates)
        context = trie.ancestors(chunk)  # all run already: a node is reached when its parent runs
        prefix = _concat_kv(kv, _select_kv(store, slot[context]))
        cache, kids, logp = _tree_forward(model, prefix, trie, p, context, chunk)
        tokens += len(chunk)
        slot[chunk] = store[0][0].shape[2] + np.arange(len(chunk))
        store = _concat_kv(store, _select_kv(cache, p + len(context) + np.arange(len(chunk))))
        pending[chunk] = False
        total[kids] = total[trie.parent[kids]] + logp
        pending[kids] = below[kids] > 0
    lengths = torch.from_numpy(trie.depth[trie.terminal])
    return ItemLogLikelihoods(torch.from_numpy(total[trie.terminal]), lengths, tokens, complete=False)


class ZeroShotScorer:
    """Scores the whole catalogue for a user's history with an untouched causal LM.

    Candidate tokens (and the trie) are built once for the catalogue; each call builds the prompt and
    runs one of the exact scorers (``method``), so all three give the same scores up to float error.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        titles: Sequence[str],
        prompt: PromptConfig | None = None,
        method: str = "trie",
        chunk_size: int = 256,
        batch_size: int = 32,
        top_k: int | None = None,
        candidates: Sequence[int] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if top_k is not None and method != "trie":
            raise ValueError(f"top_k needs method='trie' (got {method!r})")
        self.prompt = prompt or PromptConfig()
        self.model, self.method = model.eval(), method
        self.chunk_size, self.batch_size, self.top_k = chunk_size, batch_size, top_k
        # the items scored (default: all); histories may name any item of ``titles``
        self.candidates = (
            np.arange(len(titles)) if candidates is None else np.asarray(candidates, dtype=np.int64)
        )
        self.items = encode_items([titles[i] for i in self.candidates], tokenizer, self.prompt)
        self._neutral: ItemLogLikelihoods | None = None
        longest = max(len(t) for t in self.items)
        context = getattr(model.config, "max_position_embeddings", None)
        budget = self.prompt.max_prompt_tokens or (context - longest if context else None)
        if budget is None:
            raise ValueError(
                "the model config has no max_position_embeddings: set PromptConfig.max_prompt_tokens"
            )
        if context and budget + longest > context:
            raise ValueError(
                f"max_prompt_tokens={budget} + longest candidate ({longest} tokens) exceeds the model context "
                f"of {context} tokens"
            )
        self.build_prompt = PromptBuilder(tokenizer, titles, self.prompt, budget)
        self.trie = Trie(self.items) if method == "trie" else None
        if self.trie is not None:
            n_tokens = sum(len(t) for t in self.items)
            logger.info(
                "token trie: %d items, %d title tokens, %d nodes, %d inner nodes to run per user",
                len(self.items),
                n_tokens,
                len(self.trie) - 1,
                len(self.trie.inner),
            )

    def likelihoods(
        self,
        history: Sequence[int],
        exclude: Sequence[int] | None = None,
        prior: torch.Tensor | None = None,
    ) -> ItemLogLikelihoods:
        """Log-likelihood of every candidate after the prompt built from ``history`` (item indices, oldest
        first); entry j is ``candidates[j]`` (every item by default).

        With ``top_k`` set, only the exact top-k candidates by log-likelihood plus ``prior`` (one score per
        candidate), outside ``exclude`` (positions in the candidate list), are guaranteed a score
        (:func:`score_top_k`); without it ``exclude`` and ``prior`` are ignored and every candidate is scored.
        """
        ids = self.build_prompt(history)
        if self.top_k is not None:
            return score_top_k(self.model, ids, self.trie, self.top_k, exclude, self.chunk_size, prior)
        return self._score_all(ids)

    def _score_all(self, prompt_ids: list[int]) -> ItemLogLikelihoods:
        if self.method == "naive":
            return score_naive(self.model, prompt_ids, self.items)
        if self.method == "cached":
            return score_cached(self.model, prompt_ids, self.items, self.batch_size)
        return score_trie(self.model, prompt_ids, self.trie, self.chunk_size)

    def neutral(self) -> ItemLogLikelihoods:
        """``log p(title | neutral prompt)`` of every candidate: the prompt template with
        ``PromptConfig.neutral_history`` for the history. User-independent, so computed once."""
        if self._neutral is None:
            self._neutral = self._score_all(self.build_prompt.neutral())
        return self._neutral

    def normalized(self, result: ItemLogLikelihoods, normalize: str = "sum") -> torch.Tensor:
        """Every candidate's score from one :meth:`likelihoods` result: ``sum`` (log p(title | history
        prompt)), ``mean`` (per title token) or ``calibrated`` (the sum minus log p(title | neutral prompt):
        how much the history raises the title's likelihood, which removes the titles' own prior, e.g. short
        or common titles winning whatever the user watched). A top-k search ranks by its sum (plus the prior
        it searched with) only."""
        if not result.complete and normalize != "sum":
            raise ValueError(f"{normalize!r} scores need every title scored; this was a top-k search")
        if normalize == "calibrated":
            return result.total - self.neutral().total
        return result.scores(normalize)

    def variants(self, result: ItemLogLikelihoods) -> dict[str, torch.Tensor]:
        """Every normalisation of one :meth:`likelihoods` result, by name."""
        return {name: self.normalized(result, name) for name in NORMALIZATIONS}

    def users(self, histories: Sequence[Sequence[int]], seen: sp.csr_matrix | None = None) -> ZeroShotUsers:
        """This scorer over users (`llmrec.metrics.Scorer`): ``histories[u]`` is user u's history,
        ``seen`` (csr rows) what the exact top-k search leaves out."""
        return ZeroShotUsers(self, histories, seen)


class ZeroShotUsers:
    """``score(users) -> (batch, n_candidates)`` over a `ZeroShotScorer`; each user's likelihoods are
    computed once and kept, so every normalisation (:meth:`normalized`) comes from one pass over the LM.
    ``prior`` (one score per candidate, e.g. a weighted log-popularity) is added to every user's scores;
    a top-k scorer searches for the best items by score plus prior."""

    def __init__(
        self,
        scorer: ZeroShotScorer,
        histories: Sequence[Sequence[int]],
        seen: sp.csr_matrix | None = None,
        normalize: str = "sum",
        results: dict[int, ItemLogLikelihoods] | None = None,
        prior: torch.Tensor | None = None,
    ) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.scorer, self.histories, self.seen, self.normalize = scorer, histories, seen, normalize
        self.prior = prior
        self.results = {} if results is None else results

    def likelihoods(self, user: int) -> ItemLogLikelihoods:
        user = int(user)
        if user not in self.results:
            exclude = None if self.seen is None else self.seen[user].indices
            self.results[user] = self.scorer.likelihoods(self.histories[user], exclude, self.prior)
        return self.results[user]

    def score(self, users: Sequence[int] | np.ndarray) -> torch.Tensor:
        scores = torch.stack([self.scorer.normalized(self.likelihoods(u), self.normalize) for u in users])
        return scores if self.prior is None else scores + self.prior

    def normalized(self, normalize: str, prior: torch.Tensor | None = None) -> ZeroShotUsers:
        """The same users and likelihoods, scored with another normalisation (one of ``NORMALIZATIONS``)
        and ``prior`` added. A top-k search depends on its prior, so another prior starts afresh there."""
        shared = self.scorer.top_k is None or prior is self.prior
        return ZeroShotUsers(
            self.scorer, self.histories, self.seen, normalize, self.results if shared else None, prior
        )
