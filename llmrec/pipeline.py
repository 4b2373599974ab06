"""From a dataset bundle to what the recommender trains and is evaluated on.

Pretraining reads the bundle's collaborative and content corpora; finetuning and evaluation render
the bundle's finetune template from each user's chronological training history, so the prompt that
is scored at test time is exactly the one the model was finetuned on (with every training item).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from common.log import get_logger
from data_prep import Bundle, DataError
from data_prep.cold import cold_ids
from llmrec.backbone import BackboneConfig
from llmrec.collate import FinetuneDataset, PretrainDataset, SequenceDataset, TaskMixture
from llmrec.decoding import GenerativeScorer, SemanticPrompts, require_index
from llmrec.generate import NextSemanticDataset, SemanticDataset, SemanticSequenceDataset
from llmrec.head import PRIOR_WEIGHTS
from llmrec.losses import ItemSoftmax
from llmrec.metrics import (
    DEFAULT_KS,
    LOO_KS,
    evaluate_scorer,
    history_splits,
    is_leave_one_out,
    with_selection_metric,
)
from llmrec.model import CLLM4Rec, ModelConfig
from llmrec.options import PRETRAIN_CORPORA, PROMPT_KINDS
from llmrec.prompts import FinetunePrompts
from llmrec.scoring import ItemHeadScorer, valid_metric
from llmrec.textid import TextIDDataset

logger = get_logger(__name__)
# finetuning task -> the prompt it trains on (and is evaluated with)
FINETUNE_TASKS = {
    "multinomial": "masked",
    "semantic": "masked",
    "both": "masked",
    "sequential": "sequence",
    "semantic_next": "sequence",
    "semantic_sequence": "semantic_sequence",
}
GENERATIVE_TASKS = ("semantic", "semantic_next", "semantic_sequence")  # validated by constrained beam search


def input_histories(bundle: Bundle, split: str) -> list[list[int]]:
    """Every user's input when ranking ``split`` (`metrics.history_splits`), oldest first: the training
    items, then, for the test split of a leave-one-out bundle, the validation item (which follows them
    in time)."""
    parts = [bundle.histories(name) for name in history_splits(bundle, split)]
    return [[item for part in rows for item in part] for rows in zip(*parts, strict=True)]


def require_same_catalogue(bundle: Bundle, model: CLLM4Rec, what: str) -> None:
    """Refuse, before any work, a bundle whose users and items are not the ones ``model`` was built for
    (its ID tables and head would score the wrong catalogue, or fail with a shape error much later)."""
    found, expected = (bundle.n_users, bundle.n_items), (model.vocab.n_users, model.vocab.n_items)
    if found != expected:
        raise DataError(
            f"{what} was built for {expected[0]} users and {expected[1]} items, this dataset bundle has "
            f"{found[0]} and {found[1]}: use the bundle it was trained on",
            file=bundle.path,
        )


def _present(bundle: Bundle, names: Sequence[str]) -> list[str]:
    """The corpora among ``names`` that have documents; an empty one (a source without item text, user
    text or reviews) is skipped with a warning."""
    present = [name for name in names if len(bundle.corpus(name))]
    for name in sorted(set(names) - set(present)):
        logger.warning("the %s corpus of %s is empty: %s training is skipped", name, bundle.path, name)
    return present


def model_for(bundle: Bundle, config: ModelConfig, backbone: BackboneConfig, seed: int = 0) -> CLLM4Rec:
    """A fresh recommender sized to the bundle's users and items (titles for ``title_mean`` init)."""
    return CLLM4Rec.from_config(
        config, backbone, bundle.n_users, bundle.n_items, item_titles=bundle.item_titles, seed=seed
    )


def prompt_template(bundle: Bundle, kind: str = "masked") -> str:
    """The prompt a task trains and is scored on: ``masked`` is the bundle's finetune template (a masked
    history, then "<user> will interact with"); ``sequence`` is the collaborative prompt followed by the
    chronological history, whose last item position predicts the next item; ``semantic_sequence`` is
    that prompt with each history item written as its semantic ID (`generate.SemanticPrompts`)."""
    if kind == "masked":
        return bundle.templates.finetune
    if kind in ("sequence", "semantic_sequence"):
        return bundle.templates.collaborative + " {history}"
    raise ValueError(f"unknown prompt kind {kind!r}: expected one of {PROMPT_KINDS}")


def prompts_for(bundle: Bundle, model: CLLM4Rec, kind: str = "masked") -> FinetunePrompts:
    args = (model.vocab, model.tokenizer, prompt_template(bundle, kind), model.config.max_doc_tokens)
    if kind == "semantic_sequence":
        return SemanticPrompts(*args, index=require_index(model), history=model.config.semantic_history)
    return FinetunePrompts(*args)


def pretrain_dataset(
    bundle: Bundle, model: CLLM4Rec, seed: int, corpora: Sequence[str] = PRETRAIN_CORPORA
) -> PretrainDataset:
    present = _present(bundle, corpora)
    if not present:
        raise DataError(f"the corpora {list(corpora)} are all empty: nothing to train on", file=bundle.path)
    rows = [row for name in present for row in bundle.corpus(name)]
    return PretrainDataset(
        rows, model.vocab, model.tokenizer, seed=seed, max_tokens=model.config.max_doc_tokens
    )


def finetune_dataset(
    bundle: Bundle,
    model: CLLM4Rec,
    seed: int,
    mask_ratio: float = 0.2,
    target: str = "all",
    with_content: bool = True,
    task: str = "multinomial",
    prompt_order: str = "shuffled",
    sequence_windows: bool = False,
    text_id_weight: float = 0.0,
    item_targets: bool = False,
) -> FinetuneDataset | TaskMixture:
    """Finetuning examples of ``task``: masked-history examples for the item head (``"multinomial"``),
    for writing a held-out item's semantic ID (``"semantic"``, needs a model with an item index) or both;
    next-item examples on the chronological history for the item head (``"sequential"``, every prefix
    in one forward; with ``sequence_windows``, every window of a long history) or for writing the next
    item's semantic ID (``"semantic_next"``, one prefix per user) or every item's semantic ID after the
    history written in semantic IDs (``"semantic_sequence"``, every position in one forward, windows as
    ``"sequential"``). ``text_id_weight`` > 0 mixes LC-Rec's text-ID tasks into a semantic-ID task
    (`llmrec.textid`: that many rows per main-task row); ``item_targets`` gives ``"semantic_sequence"``
    examples the next items' indices for the auxiliary item softmax (``model.item_loss_weight``). With
    ``with_content`` the content corpus keeps the content view (and the mutual regulariser) training
    alongside, as in CLLM4Rec's finetuning. Cold users (a cold-users split) are left out."""
    if task not in FINETUNE_TASKS:
        raise ValueError(f"unknown finetune task {task!r}: expected one of {tuple(FINETUNE_TASKS)}")
    histories = list(bundle.histories("train"))  # a copy: the bundle caches
    prompts = prompts_for(bundle, model, FINETUNE_TASKS[task])
    for user in cold_ids(bundle.manifest, "users"):  # a cold user's history is given at evaluation only
        histories[user] = []
    parts: list = []
    if task in ("multinomial", "both"):
        parts.append(
            FinetuneDataset(
                histories, prompts, seed=seed, mask_ratio=mask_ratio, target=target, prompt_order=prompt_order
            )
        )
    if task in ("semantic", "both"):
        parts.append(
            SemanticDataset(histories, prompts, require_index(model), seed=seed, mask_ratio=mask_ratio)
        )
    if task == "sequential":
        parts.append(SequenceDataset(histories, prompts, windows=sequence_windows))
    if task == "semantic_next":
        parts.append(NextSemanticDataset(histories, prompts, require_index(model), seed=seed))
    if task == "semantic_sequence":
        parts.append(SemanticSequenceDataset(histories, prompts, sequence_windows, item_targets))
    if item_targets and task != "semantic_sequence":
        raise ValueError(f"item_targets: only task semantic_sequence writes them, not {task!r}")
    if text_id_weight > 0:
        if task not in GENERATIVE_TASKS:
            raise ValueError(f"text_id_weight: the text-ID tasks train semantic IDs, task {task!r} has none")
        per_kind = max(1, round(text_id_weight * len(parts[0]) / 3))
        parts.append(
            TextIDDataset(
                bundle.item_titles,
                histories,
                model.vocab,
                model.tokenizer,
                require_index(model),
                per_kind,
                seed=seed,
                max_tokens=model.config.max_doc_tokens,
            )  # fmt: skip
        )
    if with_content and _present(bundle, ("content",)):
        parts.append(pretrain_dataset(bundle, model, seed, corpora=("content",)))
    return parts[0] if len(parts) == 1 else TaskMixture(*parts)


def scorer_for(
    bundle: Bundle, model: CLLM4Rec, batch_size: int = 32, split: str = "valid", prompt: str = "masked"
) -> ItemHeadScorer:
    """The item head over prompts of each user's input history for ``split`` (`input_histories`)."""
    histories = input_histories(bundle, split)
    return ItemHeadScorer(model, prompts_for(bundle, model, prompt), histories, batch_size=batch_size)


def generative_scorer(
    bundle: Bundle,
    model: CLLM4Rec,
    split: str,
    beam: int = 100,
    batch_size: int = 32,
    prompt: str = "masked",
    exclude_seen: bool = True,
    candidates: Sequence[int] | np.ndarray | None = None,
) -> GenerativeScorer:
    """Constrained beam search over the model's item index; with ``exclude_seen`` the items that
    ``split``'s ranking excludes (training items, plus validation items for the test split) are kept out
    of the search itself. ``candidates``: the only items searched for anyone (a cold-items split's cold
    view ranks its cold items only), every other item kept out of the search the same way."""
    exclude = bundle.seen(split) if exclude_seen else None
    if candidates is not None:
        others = np.ones(bundle.n_items, dtype=np.float32)
        others[np.asarray(candidates, dtype=np.int64)] = 0
        rest = sp.csr_matrix(np.ones((bundle.n_users, 1), dtype=np.float32)) @ sp.csr_matrix(others[None, :])
        exclude = rest if exclude is None else exclude + rest
    return GenerativeScorer(
        model,
        prompts_for(bundle, model, prompt),
        input_histories(bundle, split),
        exclude,
        beam=beam,
        batch_size=batch_size,
    )


def cold_view_scorers(
    bundle: Bundle,
    model: CLLM4Rec,
    split: str,
    cold: Sequence[int] | np.ndarray,
    beam: int,
    batch_size: int = 32,
    prompt: str = "semantic_sequence",
) -> tuple[GenerativeScorer, GenerativeScorer]:
    """A generator's two scorers for `llmrec.metrics.evaluate_cold_items`: the beam over the whole trie
    (the ``all`` view) and over the ``cold`` items' part of it only (its ``cold_scorer``)."""
    return tuple(
        generative_scorer(bundle, model, split, beam, batch_size, prompt, candidates=only)
        for only in (None, cold)
    )


def fit_prior(bundle: Bundle, model: CLLM4Rec) -> dict[str, float]:
    """Fit the model's collaborative prior (its item head's, ``prior: ease``) on the training matrix (EASE,
    lambda chosen on valid by NDCG@100)."""
    from llmrec.baselines import EASE  # the classical models load only when a prior is asked for

    if not model.head.has_prior:
        raise ValueError("fit_prior: the model's item head has no prior (prior: none)")
    ease = EASE().fit(bundle.matrix("train"), bundle.matrix("valid"))
    model.head.fit_prior(ease.weights)
    return {"lambda": ease.lam}


def choose_prior_weight(
    bundle: Bundle,
    model: CLLM4Rec,
    metric: str = "cllm4rec",
    batch_size: int = 64,
    weights: Sequence[float] = PRIOR_WEIGHTS,
    prompt: str = "masked",
) -> tuple[float, dict[float, float]]:
    """The blend weight of the prior with the best ``metric`` on valid, set on the model's item head
    (`llmrec.head.ItemHead.choose_prior_weight`), and the metric of every weight tried.

    The LM and the prior are scored once, on the ``prompt`` kind the model trained on; each weight only
    re-blends the two (standardised) matrices.
    """
    users, valid = valid_metric(bundle, metric, batch_size)
    logits, prior = scorer_for(bundle, model, batch_size, prompt=prompt).parts(users)
    return model.head.choose_prior_weight(logits, prior, valid, weights)


def blend_prior(
    bundle: Bundle, run: str | Path, metric: str = "cllm4rec", batch_size: int = 64, prompt: str = "masked"
) -> float:
    """Choose the prior's blend weight on valid for the run's model (`llmrec.run.run_model_dir`), scored on
    its task's ``prompt`` kind, and record it in ``RUN/prior_weight.json`` (`llmrec.run.write_prior_weight`),
    where evaluation, alignment and export read it (`llmrec.run.run_model`); the model directory is not
    rewritten. Finetuning calls it after training, alignment with ``--prior_weight choose``."""
    from llmrec.run import run_model_dir, write_prior_weight

    directory = run_model_dir(run)
    model = CLLM4Rec.from_pretrained(directory)
    weight, grid = choose_prior_weight(bundle, model, metric, batch_size=batch_size, prompt=prompt)
    logger.info("prior weight %g chosen on valid (%s by weight: %s)", weight, metric, grid)
    write_prior_weight(run, directory, weight, {metric: grid})
    return weight


def item_softmax(
    bundle: Bundle, mode: str = "full", chunk_size: int = 65536, num_samples: int = 8192
) -> ItemSoftmax:
    """The finetuning softmax; the sampled one draws negatives by training popularity (its log q)."""
    log_q = None
    if mode == "sampled":
        counts = np.asarray(bundle.matrix("train").sum(axis=0)).ravel() + 1.0
        log_q = torch.log(torch.as_tensor(counts / counts.sum(), dtype=torch.float32))
    return ItemSoftmax(mode, chunk_size=chunk_size, num_samples=num_samples, log_q=log_q)


def evaluate_model(
    bundle: Bundle,
    model: CLLM4Rec,
    split: str,
    batch_size: int = 64,
    beam: int = 0,
    prompt: str = "masked",
    exclude_seen: bool = True,
    diagnostic_users: int = 0,
    **kwargs,
) -> dict[str, float]:
    """Full-catalogue metrics of ``model`` on ``split`` (seen items excluded unless ``exclude_seen`` is
    off), one forward pass per user over the ``prompt`` kind the model was finetuned on.

    With ``beam`` > 0 the ranked lists come from constrained beam search of semantic IDs instead (the
    generative task); a list holds ``beam`` items, so ``beam`` must cover the largest cut-off (without
    ``ks``, the default cut-offs it covers are reported). Then
    ``diagnostic_users`` > 0 adds the validity diagnostics (`GenerativeScorer.diagnostics`) of that
    many evaluated users as ``validity/...`` keys.
    """
    if beam:
        if not kwargs.get("ks"):  # the default cut-offs the lists cover (validation of a short beam)
            default = LOO_KS if is_leave_one_out(bundle) else DEFAULT_KS
            kwargs["ks"] = tuple(k for k in default if k <= beam) or (beam,)
        ks = kwargs["ks"]
        if beam < max(ks):
            raise ValueError(
                f"beam {beam} is shorter than the largest cut-off @{max(ks)}: lists would be padded"
            )
        scorer = generative_scorer(bundle, model, split, beam, batch_size, prompt, exclude_seen)
    else:
        scorer = scorer_for(bundle, model, batch_size, split, prompt)
    metrics = evaluate_scorer(
        scorer, bundle, split, batch_size=batch_size, exclude_seen=exclude_seen, **kwargs
    )
    if beam and diagnostic_users:
        users = np.flatnonzero(np.diff(bundle.matrix(split).indptr) > 0)[:diagnostic_users]
        metrics.update({f"validity/{key}": value for key, value in scorer.diagnostics(users).items()})
    return with_selection_metric(metrics)


def validation_fn(
    bundle: Bundle, batch_size: int = 64, beam: int = 0, prompt: str = "masked"
) -> Callable[[CLLM4Rec], dict[str, float]]:
    return partial(
        evaluate_model, bundle, split="valid", batch_size=batch_size, beam=beam, prompt=prompt, progress=False
    )
