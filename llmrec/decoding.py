"""Decoding semantic IDs: the LM writes an item's code tuple, a prefix trie keeps it real.

The inference half of the semantic-ID generator (the training datasets are in `llmrec.generate`), in the
serving layer so that evaluation (`llmrec.pipeline.generative_scorer`) and an exported generator bundle
(`llmrec.recommender.Recommender`) rank with the same code: one prompt builder (:class:`SemanticPrompts`),
one trie (:class:`TrieTensors`), one beam search (:func:`constrained_beam_search`), one scorer
(:class:`GenerativeScorer`).

Decoding (:func:`constrained_beam_search`): the prompt runs once; each level then runs the beams' code
prefixes against the prompt's KV cache, shared by a user's beams (:class:`ModelDecoder`). At each level a
beam may only continue with the codes that the :class:`~llmrec.trie.Trie` allows after its prefix (and
only towards items not excluded for that user), so every finished beam is a real, unseen item: no
hallucinated IDs, which a per-level token mask alone cannot promise. An item's score is the sum of its
codes' log-probabilities under the per-level softmax, the quantity training maximises (not renormalised
over the allowed codes). With a beam at least as wide as every level's candidate set the search is
exhaustive, hence exact.

Why not ``transformers``' ``generate`` with ``prefix_allowed_tokens_fn``: the semantic tokens are not in
the LM's output vocabulary (they live in `RecEmbedding` tables, scored per level), its allowed-token
callback runs per beam in Python, and per-user exclusion of seen items needs the item counts under
each trie node, kept here as tensors (:class:`TrieTensors`). `llmrec.generate.generate_reference` runs
that ``generate`` as the reference the search is tested against.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from llmrec.model import CLLM4Rec
from llmrec.options import SEMANTIC_HISTORIES
from llmrec.prompts import FinetunePrompts, prompt_batch

if TYPE_CHECKING:
    from llmrec.indexing.base import ItemIndex

logger = logging.getLogger(__name__)


@dataclass
class SemanticPrompts(FinetunePrompts):
    """Prompts whose history items are written as their semantic IDs: ``<s0_a> <s1_b> <s2_c>`` per item
    (``history="codes"``), or the codes followed by the item's own token (``"codes_item"``).

    The item token comes after the codes, not before: before them it would name the item whose codes
    the position is trained to predict. Every item's codes follow the prompt the same way the generated
    ones do, so one causal forward trains every next item (:class:`SemanticSequenceDataset`) and the
    evaluation prompt is that forward's prefix.
    """

    index: ItemIndex | None = None
    history: str = "codes"

    def __post_init__(self) -> None:
        if self.history not in SEMANTIC_HISTORIES:
            raise ValueError(
                f"unknown semantic history {self.history!r}: expected one of {SEMANTIC_HISTORIES}"
            )
        tokens = require_index_of(self.index).token_ids(self.vocab)
        self.codes = [[int(t) for t in row if t >= 0] for row in tokens]

    def item_width(self, item: int) -> int:
        return len(self.codes[item]) + (self.history == "codes_item")

    def item_text(self, item: int) -> str:
        tokens = self.codes[item] + ([self.vocab.item_token(item)] if self.history == "codes_item" else [])
        return " ".join(self.vocab.placeholder(t) for t in tokens)


class TrieTensors:
    """An item index's prefix trie as flat tensors on one device, with the number of items under each node.

    Edges are grouped by parent node (sorted by code), so those of node ``n`` are ``edge_start[n]:edge_end[n]``.
    Only prefix-free indexes decode: an item's tuple may not be the prefix of another's (SentencePiece
    pieces can be; they would need an end-of-ID token, which this task does not train).
    """

    def __init__(self, index: ItemIndex, device: torch.device | str = "cpu"):
        trie = index.trie()
        inner_items = np.flatnonzero((trie.node_item >= 0) & (trie.n_children > 0))
        if len(inner_items):
            raise ValueError(
                f"item {trie.node_item[inner_items[0]]}'s code tuple is the prefix of another item's: "
                "constrained decoding needs a prefix-free index (not SentencePiece pieces)"
            )
        counts = np.bincount(trie.nodes[trie.nodes >= 0], minlength=trie.n_nodes)
        counts[0] = index.n_items

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.long, device=device)

        self.edge_code, self.edge_child = tensor(trie.token[trie.child_nodes]), tensor(trie.child_nodes)
        self.edge_start, self.edge_end = tensor(trie.child_ptr[:-1]), tensor(trie.child_ptr[1:])
        self.node_item, self.item_count = tensor(trie.node_item), tensor(counts)
        self.paths = tensor(trie.nodes)  # (n_items, max_len): the node of every prefix of every item
        self.max_children = int(trie.n_children.max())
        self.max_len, self.n_nodes, self.n_items = index.max_len, trie.n_nodes, index.n_items
        self.shared_codebook = index.shared_codebook

    def level(self, depth: int) -> int:
        """The codebook (semantic token level) of tuple position ``depth``."""
        return 0 if self.shared_codebook else depth

    def remaining(self, excluded: Sequence[Sequence[int]]) -> torch.Tensor:
        """(rows, n_nodes) items under every node that are not in that row's ``excluded`` items.

        Dense over nodes (a few int32 rows of about 1.1 x n_items each): cheap next to the KV cache.
        """
        device = self.item_count.device
        rows = torch.as_tensor(np.repeat(np.arange(len(excluded)), [len(e) for e in excluded]), device=device)
        items = np.concatenate(
            [np.zeros(0, dtype=np.int64), *(np.asarray(e, dtype=np.int64) for e in excluded)]
        )
        nodes = self.paths[torch.as_tensor(items, device=device)]  # (n_excluded, max_len)
        flat = (rows[:, None] * self.n_nodes + nodes)[nodes >= 0]
        removed = torch.bincount(flat, minlength=len(excluded) * self.n_nodes).view(len(excluded), -1)
        return (self.item_count - removed).int()


class SemanticDecoder(Protocol):
    """What beam search needs from a model: log-probabilities of the next code, row by row."""

    def start(self) -> torch.Tensor:
        """(rows, codebook size of position 0) log-probabilities after the prompts."""

    def advance(self, parents: torch.Tensor, depth: int, codes: torch.Tensor) -> torch.Tensor:
        """Continue row ``parents[j]`` with code ``codes[j]`` at position ``depth``; the new rows' next-code
        log-probabilities (len(parents), codebook size of position depth + 1)."""


@torch.no_grad()
def constrained_beam_search(
    decoder: SemanticDecoder,
    trie: TrieTensors,
    beam: int,
    top_k: int,
    remaining: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` best items per prompt row as (items, scores), both (rows, top_k), best first.

    Beams only follow trie edges (and, with ``remaining`` from `TrieTensors.remaining`, only towards
    nodes with items left for that row); a beam that reaches an item (a leaf; tuples may differ in length)
    carries over unchanged. Rows with fewer than ``top_k`` reachable items are padded with item -1 and
    score -inf. The search keeps ``beam`` hypotheses per row; ``beam >= top_k``.
    """
    if not 1 <= top_k <= beam:
        raise ValueError(f"need 1 <= top_k <= beam, got top_k={top_k}, beam={beam}")
    logp = decoder.start()
    rows, device = logp.shape[0], logp.device
    span = trie.max_children
    offsets = torch.arange(span, device=device)
    score = torch.zeros(rows, 1, device=device)
    node = torch.zeros(rows, 1, dtype=torch.long, device=device)
    for depth in range(trie.max_len):
        width = node.shape[1]
        edge = trie.edge_start[node][..., None] + offsets  # (rows, width, span)
        valid = edge < trie.edge_end[node][..., None]  # leaves (finished beams) have no edges
        edge = torch.where(valid, edge, 0)
        codes = torch.where(valid, trie.edge_code[edge], 0)
        child = trie.edge_child[edge]
        if remaining is not None:
            valid &= remaining.gather(1, child.view(rows, -1)).view(rows, width, span) > 0
        grow = score[..., None] + logp.view(rows, width, -1).float().gather(-1, codes)
        grow = grow.masked_fill(~valid, float("-inf"))
        finished = trie.node_item[node] >= 0
        stay = score.masked_fill(~finished, float("-inf"))[..., None]
        candidates = torch.cat([grow, stay], dim=-1).view(rows, -1)  # (rows, width * (span + 1))
        score, flat = candidates.topk(min(beam, candidates.shape[1]), dim=1)
        parent, column = flat // (span + 1), flat % (span + 1)
        moved = column < span
        picked = parent * span + column.clamp(max=span - 1)
        node = torch.where(moved, child.view(rows, -1).gather(1, picked), node.gather(1, parent))
        if depth + 1 == trie.max_len or bool((trie.node_item[node] >= 0).all()):
            break
        code = torch.where(moved, codes.view(rows, -1).gather(1, picked), 0)
        source = torch.arange(rows, device=device)[:, None] * width + parent
        logp = decoder.advance(source.view(-1), depth, code.view(-1))
    items = trie.node_item[node][:, :top_k]
    score = score[:, :top_k]
    found = torch.isfinite(score) & (items >= 0)
    return items.masked_fill(~found, -1), score.masked_fill(~found, float("-inf"))


@torch.no_grad()
def unconstrained_beam_search(
    decoder: SemanticDecoder, codebook_sizes: Sequence[int], beam: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over every code tuple, with no trie: (rows, beam, levels) codes and (rows, beam) scores.

    What the generator writes when nothing keeps it to real items, for the validity diagnostics; the
    tuples may name no item. Fixed-length tuples only (one code per level).
    """
    logp = decoder.start()
    rows, device = logp.shape[0], logp.device
    score = torch.zeros(rows, 1, device=device)
    codes = torch.zeros(rows, 1, 0, dtype=torch.long, device=device)
    for depth, size in enumerate(codebook_sizes):
        width = score.shape[1]
        candidates = (score[..., None] + logp.view(rows, width, size).float()).view(rows, -1)
        score, flat = candidates.topk(min(beam, candidates.shape[1]), dim=1)
        parent, code = flat // size, flat % size
        codes = torch.cat([codes.gather(1, parent[..., None].expand(-1, -1, depth)), code[..., None]], dim=2)
        if depth + 1 < len(codebook_sizes):
            source = torch.arange(rows, device=device)[:, None] * width + parent
            logp = decoder.advance(source.view(-1), depth, code.reshape(-1))
    return codes, score


class ModelDecoder:
    """`SemanticDecoder` over a `CLLM4Rec`: the prompts run once, then every step runs the beams' code prefixes
    against the prompts' KV cache, which a user's beams share instead of copying it per beam.

    A user's beams are laid side by side as one short sequence after the prompt, with a 4D attention mask
    that lets each code see its (unpadded) prompt and the earlier codes of its own beam only, at the
    positions a teacher-forced forward of prompt + code tuple uses (right-padded prompts continue at each
    row's own length). Why not HF's beam layout (the cache repeated per beam and re-indexed every step):
    that copies users x beams x prompt length of keys and values per step and holds the prompt ``beam``
    times, while re-running prefixes of a few codes costs only beams x levels extra tokens per user.
    The prefix tokens are cropped off the cache after each step.
    """

    def __init__(
        self, model: CLLM4Rec, input_ids: torch.Tensor, attention_mask: torch.Tensor, trie: TrieTensors
    ):
        self.model, self.input_ids, self.mask, self.trie = model, input_ids, attention_mask, trie
        self.cache = None
        self.lengths = attention_mask.sum(dim=1)
        self.prefix = input_ids.new_zeros(len(input_ids), 1, 0)  # (users, beams, depth) token ids so far

    def _log_probs(self, hidden: torch.Tensor, depth: int) -> torch.Tensor:
        return F.log_softmax(self.model.semantic_logits(hidden, self.trie.level(depth)).float(), dim=-1)

    def start(self) -> torch.Tensor:
        hidden, self.cache = self.model.hidden_states_cached(self.input_ids, self.mask)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), self.lengths - 1]
        return self._log_probs(last, 0)

    def advance(self, parents: torch.Tensor, depth: int, codes: torch.Tensor) -> torch.Tensor:
        users, prompt_width = self.mask.shape
        width, steps = len(parents) // users, depth + 1
        token = self.model.vocab.level_range(self.trie.level(depth)).start + codes
        previous = self.prefix.reshape(users * self.prefix.shape[1], depth)[parents]
        self.prefix = torch.cat([previous, token[:, None]], dim=1).view(users, width, steps)
        device = self.mask.device
        step = torch.arange(steps, device=device).repeat(width)  # position of each query token in its beam
        beam = torch.arange(width, device=device).repeat_interleave(steps)
        own = (beam[:, None] == beam[None, :]) & (step[None, :] <= step[:, None])  # (queries, queries)
        queries = width * steps
        allowed = torch.cat(
            [
                self.mask.bool()[:, None, :].expand(users, queries, prompt_width),
                own.expand(users, queries, queries),
            ],
            dim=2,
        )
        dtype = self.model.collab.base.weight.dtype
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
        additive = additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (users, 1, q, kv)
        hidden, self.cache = self.model.hidden_states_cached(
            self.prefix.view(users, queries),
            additive,
            cache=self.cache,
            position_ids=self.lengths[:, None] + step,
        )
        self.cache.crop(-queries)
        last = hidden.view(users, width, steps, -1)[:, :, -1]
        return self._log_probs(last.reshape(users * width, -1), depth + 1)


def index_validity(index: ItemIndex) -> dict[str, float]:
    """Collision rate (and, where the indexer recorded it, the rate before resolution) and per-level
    codebook usage of an item index."""
    from llmrec.indexing.base import codebook_stats, collision_stats

    out = {"collision_rate": float(collision_stats(index.codes)["collision_rate"])}
    if "collision_rate_before" in index.stats:
        out["collision_rate_before"] = float(index.stats["collision_rate_before"])
    usage = codebook_stats(index.codes, index.codebook_sizes, index.shared_codebook)["utilisation"]
    out.update({f"codebook_usage@{level}": float(u) for level, u in enumerate(usage)})
    return out


def require_index(model: CLLM4Rec) -> ItemIndex:
    """The model's item index, or a clear error for a model built without one."""
    return require_index_of(model.item_index)


def require_index_of(index: ItemIndex | None) -> ItemIndex:
    if index is None:
        raise ValueError(
            "the model has no item index: build one (recipes/index.py) and set ModelConfig.index"
        )
    return index


class GenerativeScorer:
    """Top-K lists by constrained beam search for users, from prompts that hold all their training items.

    ``exclude`` (csr, users x items) removes items from each user's search space (seen items), so every
    returned list is full whenever enough items remain. ``batch_size`` users are searched together.
    :meth:`score` gives (users, n_items) scores (-inf outside the list; `llmrec.metrics.Scorer`),
    :meth:`recommend` the lists. ``trie``: the index's `TrieTensors` on the model's device, when the
    caller keeps one (`llmrec.recommender.Recommender`); default built from the model's item index.
    """

    def __init__(
        self,
        model: CLLM4Rec,
        prompts: FinetunePrompts,
        histories: Sequence[Sequence[int]],
        exclude: sp.csr_matrix | None = None,
        beam: int = 20,
        batch_size: int = 32,
        trie: TrieTensors | None = None,
    ):
        self.model, self.prompts, self.histories, self.beam = model, prompts, histories, beam
        self.exclude = None if exclude is None else sp.csr_matrix(exclude)
        self.batch_size = batch_size
        self.device = next(p for p in model.parameters() if p.requires_grad).device
        self.trie = trie if trie is not None else TrieTensors(require_index(model), self.device)

    @torch.no_grad()
    def recommend(
        self,
        users: Sequence[int] | np.ndarray,
        top_k: int | None = None,
        excluded: Sequence[Sequence[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(items, scores), each (len(users), top_k) on the CPU, best first; item -1 pads a short list.

        ``excluded``: one list of items per entry of ``users``, kept out of that row's search instead of
        its row of ``exclude`` (a caller's per-request exclusions)."""
        top_k = top_k or self.beam
        if excluded is not None and len(excluded) != len(users):
            raise ValueError(f"{len(excluded)} lists of excluded items for {len(users)} users")
        self.model.eval()
        items, scores = [], []
        for start in range(0, len(users), self.batch_size):
            chunk = [int(u) for u in users[start : start + self.batch_size]]
            decoder = self._decoder(chunk)
            rows = None
            if excluded is not None:
                rows = excluded[start : start + self.batch_size]
            elif self.exclude is not None:
                rows = [self.exclude[u].indices for u in chunk]
            remaining = None if rows is None else self.trie.remaining(rows)
            found, score = constrained_beam_search(decoder, self.trie, self.beam, top_k, remaining)
            items.append(found.cpu())
            scores.append(score.cpu())
        items, scores = torch.cat(items), torch.cat(scores)
        short = int((items[:, -1] < 0).sum())
        if short:
            logger.info("%d of %d users got fewer than %d items", short, len(users), top_k)
        return items, scores

    def _decoder(self, users: Sequence[int]) -> ModelDecoder:
        batch = prompt_batch(
            [self.prompts.encode(u, self.histories[u]) for u in users],
            pad_token_id=self.model.tokenizer.pad_token_id or 0,
        )
        return ModelDecoder(
            self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device), self.trie
        )

    @torch.no_grad()
    def diagnostics(self, users: Sequence[int] | np.ndarray) -> dict[str, float]:
        """Validity of what is generated for ``users``, with the trie and without it, and of the index.

        - ``invalid_rate``: share of generated entries that are not real items (0 with the trie, by
          construction; measured, not assumed); ``invalid_rate_free``: the same for beam search with no
          trie (fixed-length indexes only), whose tuples may name no item;
        - ``seen_rate_free``: share of the free beams that name an item excluded for the user (seen);
        - ``duplicate_rate``/``duplicate_rate_free``: share of lists holding an item twice;
        - ``collision_rate`` (of the index used; ``collision_rate_before`` resolution when recorded) and
          ``codebook_usage@L``, the share of level L's codes that some item uses.
        """
        index = require_index(self.model)
        trie = index.trie()
        items, _ = self.recommend(users)
        found = items[items >= 0]
        real = [trie.item(index.code(int(i))) == int(i) for i in found.tolist()]
        out = {
            "invalid_rate": 1.0 - float(np.mean(real)) if real else 0.0,
            "duplicate_rate": float(
                np.mean([len(set(r)) < len(r) for r in (row[row >= 0].tolist() for row in items)])
            ),
        }
        if index.lengths().min() == index.max_len and not index.shared_codebook:
            free_items = []
            for start in range(0, len(users), self.batch_size):
                chunk = [int(u) for u in users[start : start + self.batch_size]]
                codes, _ = unconstrained_beam_search(self._decoder(chunk), index.codebook_sizes, self.beam)
                named = [[trie.item(row) for row in beams.tolist()] for beams in codes]
                free_items += [(u, row) for u, row in zip(chunk, named, strict=True)]
            flat = [i for _, row in free_items for i in row]
            out["invalid_rate_free"] = float(np.mean([i < 0 for i in flat]))
            if self.exclude is not None:
                seen = [i >= 0 and self.exclude[u, i] != 0 for u, row in free_items for i in row]
                out["seen_rate_free"] = float(np.mean(seen))
            out["duplicate_rate_free"] = float(
                np.mean([len(set(r) - {-1}) < len([i for i in r if i >= 0]) for _, r in free_items])
            )
        out.update(index_validity(index))
        return out

    def score(self, users: np.ndarray, excluded: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """(len(users), n_items): each found item's beam score, -inf for the items not in the list
        (``excluded`` as in :meth:`recommend`)."""
        items, scores = self.recommend(users, excluded=excluded)
        dense = torch.full((len(users), self.trie.n_items), float("-inf"))
        found = items >= 0
        dense[torch.nonzero(found)[:, 0], items[found]] = scores[found]
        return dense
