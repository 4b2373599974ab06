"""The serving API: :class:`Recommender`, top-K recommendations and scores from an exported bundle.

The bundle format, its one writer and its reader are `llmrec.bundle`'s; a :class:`Recommender` loads a
bundle through `llmrec.bundle.read_bundle` and saves itself (added items, grown histories) through
`llmrec.bundle.write_bundle`. Importing it loads no model code: transformers, peft and the model load when a
bundle does (``from_pretrained``), and never the training stack (`llmrec.train`, `llmrec.collate`,
`llmrec.generate`, `data_prep`).

Prompts. A known user is scored exactly as evaluation scores them: the dataset's finetune template over
all their training items (``<user_u> has interacted with <item_a> <item_b>, <user_u> will interact
with``). A user unseen in training has no user token, so ``history=`` prompts use the *cold* template:
the finetune template with its user placeholders removed (``has interacted with <item_a> <item_b>,
will interact with``). The model never saw that prompt shape during finetuning, so cold scores are out
of distribution; they are a usable fallback, not what the model was selected for.

Modes. A bundle's ``mode`` (`llmrec.bundle`) says how it ranks: ``item_head`` scores the whole catalogue
with the item head; ``generate`` ranks by the constrained beam search of evaluation
(`llmrec.decoding.GenerativeScorer`) over the bundle's item index.
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from common.catalogue import Catalogue, id_sequence
from common.errors import UserError
from llmrec.bundle import GENERATE, ITEM_HEAD, read_bundle, write_bundle
from llmrec.metrics import RankingMetrics
from llmrec.prompts import FinetunePrompts

if TYPE_CHECKING:
    from llmrec.mapper import TextToID
    from llmrec.model import CLLM4Rec

logger = logging.getLogger(__name__)
# CPU threads of add_items: encoding ~100 short texts (a few tens of GFLOP) and growing a few tables gain
# little from more threads, and on a busy CPU extra threads wait for each other (README, Cold start)
ADD_ITEMS_THREADS = 1


def _locked(method: Callable) -> Callable:
    """Run a :class:`Recommender` method under the instance's lock (see the class docstring)."""

    @functools.wraps(method)
    def call(self: Recommender, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return call


@dataclass(frozen=True)
class Recommendation:
    """One recommended item: raw id, catalogue index, title and score (the item head's logit; for a
    generator bundle the beam's log-probability of the item's code tuple)."""

    item: str
    index: int
    title: str
    score: float


class Recommender:
    """Top-K recommendations and full-catalogue scores from an exported bundle.

    Known users (``user=RAW_ID``) are scored from the same prompt as evaluation (all training items,
    finetune template); ``history=[RAW_ITEM_IDS]`` scores a user unseen in training from the cold
    template (out of distribution; see the module docstring). Ties are broken by the lower item index,
    as in evaluation.

    A known user's prompt runs through the LM once: its item-head input is cached
    (`llmrec.scoring.UserStates`; ``n_users x hidden`` floats, plus the keys and values of the last
    ``kv_users`` prompts), so later calls cost one head product. :meth:`warm_cache` fills the cache
    ahead of time, :meth:`update` grows a history on top of the cached prompt.

    Thread-safe: every public method runs under one lock per instance (a re-entrant lock), so threads
    may share a recommender; their calls run one at a time (each forward pass uses torch's own threads).
    The cache, the histories, the catalogue and the model change only under that lock.

    A generator bundle (``mode`` ``generate``, see the module docstring) ranks as evaluation does
    (``recipes/evaluate.py --generate true``): the same prompts, and the constrained beam search of
    `llmrec.decoding.GenerativeScorer` with the bundle's ``beam``, seen (and ``exclude``) items kept out
    of the search itself. ``recommend`` returns the beam's best ``k`` items, scored by their code tuples'
    log-probabilities; a beam holds ``beam`` items, so ``k`` above it returns those ``beam`` (load with
    ``beam=`` for longer lists). ``score`` is the matrix evaluation ranks: each of the beam's items its
    log-probability, every other item (seen ones included) -inf. There is no state to cache (the search
    runs the prompt each call): ``warm_cache`` does nothing and ``update`` grows the history.
    """

    def __init__(
        self,
        model: CLLM4Rec,
        catalogue: Catalogue,
        histories: Sequence[Sequence[int]],
        templates: dict[str, str],
        batch_size: int = 32,
        mapper: TextToID | None = None,
        dtype: str = "fp32",
        kv_users: int = 32,
        generate: Mapping[str, Any] | None = None,
    ):
        from llmrec.scoring import UserStates

        self._lock = threading.RLock()
        self.model, self.catalogue, self.batch_size = model, catalogue, batch_size
        self.histories = list(histories)  # update() grows them in place
        self.templates, self.mapper, self.dtype = templates, mapper, dtype
        # {"beam", "prompt"} of a generator bundle (module docstring), None for the item head
        self.generate = dict(generate) if generate is not None else None
        self._build_prompts()
        if self.generate is None:
            self._states = UserStates(model, self.prompts, self.histories, batch_size, kv_users=kv_users)

    @property
    def mode(self) -> str:
        """``item_head`` or ``generate`` (the bundle's ``mode``): how this recommender ranks."""
        return ITEM_HEAD if self.generate is None else GENERATE

    @property
    def beam(self) -> int | None:
        """A generator's beam width (the longest list it returns); None for the item head."""
        return None if self.generate is None else int(self.generate["beam"])

    def _build_prompts(self) -> None:
        """Prompt encoders over the model's current vocabulary (rebuilt when items are added), and a
        generator's trie (`llmrec.decoding.TrieTensors`) over the model's current item index."""
        model, max_tokens = self.model, self.model.config.max_doc_tokens
        if self.generate is not None:
            from llmrec.decoding import SemanticPrompts, TrieTensors

            device = next(p for p in model.parameters() if p.requires_grad).device
            self._trie = TrieTensors(model.item_index, device)
        if self.generate is not None and self.generate["prompt"] == "semantic_sequence":
            semantic = {"index": model.item_index, "history": model.config.semantic_history}
            self.prompts = SemanticPrompts(
                model.vocab, model.tokenizer, self.templates["user"], max_tokens, **semantic
            )
            self.cold_prompts = SemanticPrompts(
                model.vocab, model.tokenizer, self.templates["cold"], max_tokens, **semantic
            )
            return
        self.prompts = FinetunePrompts(
            model.vocab, model.tokenizer, self.templates["user"], max_tokens=max_tokens
        )
        self.cold_prompts = FinetunePrompts(
            model.vocab, model.tokenizer, self.templates["cold"], max_tokens=max_tokens
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        verify: bool = True,
        kv_users: int = 32,
        beam: int | None = None,
        **backbone_overrides: Any,
    ) -> Recommender:
        """Rebuild backbone + LoRA adapter(s) + ID-token tables + head from a bundle (and, for a generator
        bundle, its item index).

        ``device`` defaults to CUDA when available. ``backbone_overrides`` are :class:`BackboneConfig`
        fields that change how the backbone loads (``cache_dir``, ``dtype``, ``load_in_4bit``, ...). The
        backbone must have the fingerprint recorded at export. ``trust_remote_code`` is never taken from
        the bundle. ``verify=False`` skips the sha256 of every file (sizes are still checked), for
        bundles too large to hash at every load. ``kv_users``: how many known users' prompt keys and
        values the cache keeps for :meth:`update` (see :class:`Recommender`). ``beam``: a generator
        bundle's beam width instead of the one it was exported with (the run's evaluation beam, with which
        its lists equal evaluation's); refused for an item-head bundle.
        """
        loaded = read_bundle(
            directory, trust_remote_code=trust_remote_code, verify=verify, beam=beam, **backbone_overrides
        )
        model = loaded.model
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device).eval()
        logger.info(
            "loaded recommender %s: %d users, %d items, backbone %s",
            directory,
            model.vocab.n_users,
            model.vocab.n_items,
            model.backbone.name_or_path,
        )
        return cls(
            model,
            loaded.catalogue,
            loaded.histories,
            loaded.templates,
            batch_size=batch_size,
            mapper=loaded.mapper,
            dtype=loaded.dtype,
            kv_users=kv_users,
            generate=loaded.generate,
        )

    # ------------------------------------------------------------------ ids
    @property
    def n_users(self) -> int:
        return self.catalogue.n_users

    @property
    def n_items(self) -> int:
        return self.catalogue.n_items

    @property
    def user_ids(self) -> tuple[str, ...]:
        """Raw user ids by index (row ``u`` of a batch of users is ``user_ids[u]``)."""
        return tuple(self.catalogue.user_ids)

    @property
    def item_ids(self) -> tuple[str, ...]:
        """Raw item ids by index: column ``i`` of `score`/`score_batch` is ``item_ids[i]``."""
        return tuple(self.catalogue.item_ids)

    @property
    def item_titles(self) -> tuple[str, ...]:
        """Item titles by index, aligned with `item_ids`."""
        return tuple(self.catalogue.item_titles)

    @property
    def user_index(self) -> dict[str, int]:
        """Deprecated (llmrec 0.1): use `user` (raw id -> index, with a clear error) or `user_ids`."""
        _deprecated("Recommender.user_index", "Recommender.user(raw_id) or Recommender.user_ids")
        return dict(self.catalogue.user_index)

    @property
    def item_index(self) -> dict[str, int]:
        """Deprecated (llmrec 0.1): use `items` (raw ids -> indices, with a clear error) or `item_ids`."""
        _deprecated("Recommender.item_index", "Recommender.items(raw_ids) or Recommender.item_ids")
        return dict(self.catalogue.item_index)

    def user(self, raw_id: str | int) -> int:
        """Index of a known user; a clear error for an id not seen in training."""
        return self.catalogue.user(
            raw_id, hint="; for a user unseen in training pass history=[item ids] instead"
        )

    def items(self, raw_ids: Sequence[str | int]) -> list[int]:
        """Indices of catalogue items; a clear error naming the first unknown id and its position."""
        return self.catalogue.items(raw_ids)

    @_locked
    def history(self, user: str | int) -> list[str]:
        """A known user's training items (raw ids, oldest first): their prompt and their seen items."""
        return [self.catalogue.item_ids[i] for i in self.histories[self.user(user)]]

    # ------------------------------------------------------------------ catalogue
    @_locked
    def add_items(self, items: Iterable[Mapping[str, Any]] | Any) -> list[int]:
        """Add items nobody has interacted with, from their text, without retraining; returns their indices.

        ``items``: a list of ``{"id": str, "title": str, "text": str (optional)}`` dicts, or a pandas
        DataFrame with those columns. Each new item gets every ID-token row from the text-to-ID mapper
        (`llmrec.mapper.TextToID`: MiniLM embedding -> rows, fit on the items with a training history at
        export and kept by :meth:`save_pretrained`), so the item head ranks new and old items together
        and a new item may appear in ``history=[...]``. Existing items keep their rows, so their LM scores
        do not change; a prior (``ModelConfig.prior``) gives new items zero, and the history pool reads
        their mapped rows. Only the new texts are encoded (the encoder is loaded once per process); a
        bundle written without a mapper has it fit here on the first call, from the warm items' titles.

        A generator bundle gives each new item a semantic ID instead: its text (``text``, else ``title``;
        the dataset's item text starts with the title) is embedded by the encoder the item index was built
        on and coded by the index's own quantizer, a taken tuple moving to the nearest free last-level
        code under its prefix (`llmrec.indexing.newitems.add_items`); the tuple joins the trie, so the
        beam search can write it without retraining, and the item may appear in ``history=[...]``. An
        index whose embeddings cannot be recomputed here (no recorded encoder, an encoder other than the
        packaged MiniLM, a non-content index) is a one-line :class:`UserError`. Nothing changes when a
        batch is refused.
        """
        from llmrec.indexing.encoders import torch_threads
        from llmrec.mapper import TextToID, extend_items, item_texts, parse_new_items

        new = parse_new_items(items, self.catalogue.item_index)
        texts = item_texts([n["title"] for n in new], [n["text"] for n in new])
        with torch_threads(ADD_ITEMS_THREADS):
            if self.generate is not None:
                indices = self._add_coded_items(texts)
            else:
                if self.mapper is None:  # exported with --mapper false or by an older llmrec: fit once
                    logger.warning(
                        "the bundle has no text-to-ID mapper: fitting one on the warm items (once)"
                    )
                    warm = np.unique(np.concatenate([np.asarray(h, dtype=np.int64) for h in self.histories]))
                    known = item_texts(self.catalogue.item_titles, self.catalogue.item_texts)
                    self.mapper = TextToID.fit_on_texts(self.model, known, warm)
                embeddings = self.mapper.embed(texts)
                indices = list(extend_items(self.model, len(new)))
                self.mapper.apply(self.model, indices, embeddings)
        self.catalogue = self.catalogue.with_items(
            [n["id"] for n in new], [n["title"] for n in new], [n["text"] for n in new]
        )
        self._build_prompts()
        if self.generate is None:
            self._states.grow(self.prompts)
        logger.info("added %d items (%d in the catalogue)", len(new), self.n_items)
        return indices

    def _add_coded_items(self, texts: Sequence[str]) -> list[int]:
        """A generator's new items: semantic IDs from their texts, then the grown index and item family."""
        from llmrec.indexing.newitems import add_items, text_encoder
        from llmrec.mapper import embed_texts, extend_items

        if not texts:
            raise UserError("add_items: give at least one item")
        index = self.model.item_index
        grown = add_items(index, embed_texts(texts, text_encoder(index)))  # nothing has changed up to here
        return list(extend_items(self.model, len(texts), index=grown))

    @_locked
    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write this recommender, added items and mapper included (a generator: its grown item index and
        beam), as a bundle that :meth:`from_pretrained` loads."""
        return write_bundle(
            self.model,
            directory,
            self.catalogue,
            self.histories,
            self.templates,
            {"saved_by": "Recommender.save_pretrained"},
            dtype=self.dtype,
            overwrite=overwrite,
            mapper=self.mapper,
            generate=self.generate,
        )

    # ------------------------------------------------------------------ cache of known users
    @_locked
    def warm_cache(self, users: Sequence[str | int] | None = None, batch_size: int | None = None) -> None:
        """Run the prompts of ``users`` (default: every known user) through the LM now, ``batch_size``
        (default: the recommender's) at a time, so that their later calls cost one head product."""
        indices = None if users is None else [self.user(u) for u in id_sequence(users, "users")]
        if self.generate is None:  # a generator keeps no state: its search runs the prompt every call
            self._states.warm(indices, batch_size=batch_size)

    @_locked
    def update(self, user: str | int, items: Sequence[str | int]) -> bool:
        """Append ``items`` (raw ids, oldest first) to a known user's history and refresh their cached
        state; later scores rank from the grown history and exclude its items as seen.

        When the user's prompt is cached, only the new items' tokens (and the template's text after the
        history) run through the LM on its keys and values; otherwise, or when ``max_doc_tokens``
        truncation drops old items, the whole grown prompt is recomputed (`llmrec.scoring.UserStates.update`).
        Returns whether the incremental step was taken. The grown history is what
        :meth:`save_pretrained` writes.
        """
        if len(id_sequence(items, f"update of user {user!r}")) == 0:
            raise UserError(f"update of user {user!r}: give a non-empty list of item ids")
        index, added = self.user(user), self.items(items)
        if self.generate is not None:  # no cached state: the next search reads the grown history
            self.histories[index] = np.concatenate(
                [np.asarray(self.histories[index], dtype=np.int64), np.asarray(added, dtype=np.int64)]
            )
            return False
        return self._states.update(index, added)

    @_locked
    def clear_cache(self) -> None:
        """Forget the cached states (needed only after changing the model's weights in place)."""
        if self.generate is None:
            self._states.clear()

    def cached(self, users: Sequence[str | int]) -> list[bool]:
        """Whether each known user's item-head input is cached (their next score skips the LM)."""
        indices = [self.user(u) for u in users]
        return [self.generate is None and bool(self._states.known[u]) for u in indices]

    @property
    def cache_bytes(self) -> int:
        """Memory held by the cache of known users (states plus kept keys and values)."""
        with self._lock:
            return self._states.nbytes if self.generate is None else 0

    # ------------------------------------------------------------------ scores
    def score(
        self, user: str | int | None = None, *, history: Sequence[str | int] | None = None
    ) -> torch.Tensor:
        """Scores of the whole catalogue (n_items,) for one known user or one history; column i = item_ids[i]
        (a generator bundle: see :meth:`score_batch`)."""
        users, histories = _one(user, history)
        return self.score_batch(users, histories=histories)[0]

    @_locked
    def score_batch(
        self,
        users: Sequence[str | int] | None = None,
        *,
        histories: Sequence[Sequence[str | int]] | None = None,
    ) -> torch.Tensor:
        """Scores (batch, n_items) for many known users, or for many histories of unseen users.

        A generator bundle has no score for every item: its scores are the matrix evaluation ranks, the
        beam's log-probability for each of the ``beam`` items it finds outside the row's history (the
        known user's training items, or the given history) and -inf for every other item, seen items
        included. Their top ``k`` is ``recommend``'s list with ``exclude_seen`` on."""
        users, histories = self._rows(users, histories)
        if len(users if users is not None else histories) == 0:
            return torch.empty(0, self.n_items)
        if self.generate is not None:
            seen = [list(self.histories[self.user(u)]) for u in users] if users is not None else None
            return self._beam_scores(users, histories, seen)
        if users is not None:
            return self._states.score(np.asarray([self.user(u) for u in users], dtype=np.int64))
        from llmrec.scoring import ItemHeadScorer

        indexed = [self._cold_history(h, row) for row, h in enumerate(histories)]
        scorer = ItemHeadScorer(self.model, self.cold_prompts, indexed, batch_size=self.batch_size)
        return scorer.score(np.arange(len(indexed)))

    @staticmethod
    def _rows(users: Any, histories: Any) -> tuple[list | None, list | None]:
        """The call's known users or cold histories, exactly one of them, as sequences (checked)."""
        _exactly_one(users, histories, "users (known user ids)", "histories (lists of item ids)")
        if users is not None:
            return id_sequence(users, "users"), None
        return None, id_sequence(histories, "histories")

    def _beam_scores(
        self,
        users: Sequence[str | int] | None,
        histories: Sequence[Sequence[str | int]] | None,
        excluded: Sequence[Sequence[int]] | None,
    ) -> torch.Tensor:
        """(rows, n_items) beam scores of a generator (-inf outside each row's beam), ``excluded[row]``
        (default: the row's history) kept out of the search: `llmrec.decoding.GenerativeScorer`, as in
        evaluation (`llmrec.pipeline.generative_scorer`)."""
        from llmrec.decoding import GenerativeScorer

        if users is not None:
            rows = np.asarray([self.user(u) for u in users], dtype=np.int64)
            prompts, inputs = self.prompts, self.histories
        else:
            inputs = [self._cold_history(h, row) for row, h in enumerate(histories)]
            rows, prompts = np.arange(len(inputs)), self.cold_prompts
        if excluded is None:
            excluded = [list(inputs[row]) for row in rows]
        scorer = GenerativeScorer(
            self.model, prompts, inputs, beam=self.beam, batch_size=self.batch_size, trie=self._trie
        )
        return scorer.score(rows, excluded=excluded)

    def _cold_history(self, history: Sequence[str | int], row: int) -> list[int]:
        if len(id_sequence(history, f"history {row}")) == 0:
            raise UserError(
                f"history {row} is empty: a user unseen in training needs at least one item id "
                "(known users: pass user=ID)"
            )
        return self.items(history)

    # ------------------------------------------------------------------ top-K
    def recommend(
        self,
        user: str | int | None = None,
        *,
        history: Sequence[str | int] | None = None,
        k: int = 10,
        exclude_seen: bool = True,
        exclude: Sequence[str | int] = (),
    ) -> list[Recommendation]:
        """Top ``k`` items for one known user or one history; ``exclude_seen`` drops the user's training
        items (or the given history), ``exclude`` drops more raw item ids."""
        users, histories = _one(user, history)
        return self.recommend_batch(
            users, histories=histories, k=k, exclude_seen=exclude_seen, exclude=[exclude]
        )[0]

    @_locked
    def recommend_batch(
        self,
        users: Sequence[str | int] | None = None,
        *,
        histories: Sequence[Sequence[str | int]] | None = None,
        k: int = 10,
        exclude_seen: bool = True,
        exclude: Sequence[Sequence[str | int]] | None = None,
    ) -> list[list[Recommendation]]:
        """Top ``k`` lists for many known users or many histories (one forward pass per prompt; a
        generator bundle: one constrained beam search per prompt, the dropped items kept out of it)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be a whole number of items, got {k!r} ({type(k).__name__})")
        if k < 1:
            raise UserError(f"k must be a positive number of items, got {k}")
        users, histories = self._rows(users, histories)
        n_rows = len(users if users is not None else histories)
        if exclude is not None:
            exclude = id_sequence(exclude, "exclude (one list of item ids per row)")
        if exclude is not None and len(exclude) != n_rows:
            raise ValueError(f"exclude has {len(exclude)} lists for {n_rows} users")
        drops = []
        for row in range(n_rows):
            drop = self.items(exclude[row]) if exclude is not None else []
            if exclude_seen and users is not None:
                drop += list(self.histories[self.user(users[row])])
            elif exclude_seen:
                drop += self.items(histories[row])
            drops.append(drop)
        if n_rows == 0:
            return []
        if self.generate is not None:
            masked = self._beam_scores(users, histories, drops)
        else:
            masked = self.score_batch(users, histories=histories).clone()
        for row, drop in enumerate(drops):
            masked[row, drop] = float("-inf")
        k = min(k, self.n_items)
        top = RankingMetrics(self.n_items, ks=(k,)).topk(masked, k)
        return [
            [
                Recommendation(
                    self.catalogue.item_ids[i], i, self.catalogue.item_titles[i], float(masked[row, i])
                )
                for i in top[row].tolist()
                if masked[row, i] > float("-inf")
            ]
            for row in range(n_rows)
        ]


def _deprecated(name: str, instead: str) -> None:
    warnings.warn(
        f"{name} is deprecated and will be removed in llmrec 0.4; use {instead}",
        DeprecationWarning,
        stacklevel=3,
    )


def _exactly_one(first: Any, second: Any, first_name: str, second_name: str) -> None:
    if first is None and second is None:
        raise UserError(f"give {first_name} or {second_name}; neither was given")
    if first is not None and second is not None:
        raise UserError(f"give {first_name} or {second_name}, not both")


def _one(user, history) -> tuple[list | None, list | None]:
    _exactly_one(user, history, "user (a known user id)", "history (a list of item ids)")
    return ([user], None) if user is not None else (None, [history])
