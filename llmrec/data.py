"""From a dataset bundle to what the recommender trains and is evaluated on.

Pretraining reads the bundle's collaborative and content corpora; finetuning and evaluation render
the bundle's finetune template from each user's chronological training history, so the prompt that
is scored at test time is exactly the one the model was finetuned on (with every training item).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from data_prep import Bundle
from llmrec.backbone import BackboneConfig
from llmrec.collate import FinetuneDataset, PretrainDataset, TaskMixture
from llmrec.generate import GenerativeScorer, SemanticDataset, require_index
from llmrec.metrics import DEFAULT_KS, evaluate_scorer
from llmrec.model import CLLM4Rec, ItemSoftmax, ModelConfig, standardize
from llmrec.options import PRETRAIN_CORPORA
from llmrec.prompts import FinetunePrompts
from llmrec.scoring import ItemHeadScorer, PrecomputedScorer

FINETUNE_TASKS = ("multinomial", "semantic", "both")


def model_for(bundle: Bundle, config: ModelConfig, backbone: BackboneConfig, seed: int = 0) -> CLLM4Rec:
    """A fresh recommender sized to the bundle's users and items (titles for ``title_mean`` init)."""
    return CLLM4Rec.from_config(
        config, backbone, bundle.n_users, bundle.n_items, item_titles=bundle.item_titles, seed=seed
    )


def prompts_for(bundle: Bundle, model: CLLM4Rec) -> FinetunePrompts:
    return FinetunePrompts(
        model.vocab, model.tokenizer, bundle.templates.finetune, max_tokens=model.config.max_doc_tokens
    )


def pretrain_dataset(
    bundle: Bundle, model: CLLM4Rec, seed: int, corpora: Sequence[str] = PRETRAIN_CORPORA
) -> PretrainDataset:
    rows = [row for name in corpora for row in bundle.corpus(name)]
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
) -> FinetuneDataset | TaskMixture:
    """Masked-history examples for the item head (``task="multinomial"``), for writing a held-out item's
    semantic ID (``"semantic"``, needs a model with an item index) or both; with ``with_content`` the
    content corpus keeps the content view (and the mutual regulariser) training alongside, as in
    CLLM4Rec's finetuning."""
    if task not in FINETUNE_TASKS:
        raise ValueError(f"unknown finetune task {task!r}: expected one of {FINETUNE_TASKS}")
    histories, prompts = bundle.histories("train"), prompts_for(bundle, model)
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
    if with_content:
        parts.append(pretrain_dataset(bundle, model, seed, corpora=("content",)))
    return parts[0] if len(parts) == 1 else TaskMixture(*parts)


def scorer_for(bundle: Bundle, model: CLLM4Rec, batch_size: int = 32) -> ItemHeadScorer:
    return ItemHeadScorer(model, prompts_for(bundle, model), bundle.histories("train"), batch_size=batch_size)


def generative_scorer(
    bundle: Bundle, model: CLLM4Rec, split: str, beam: int = 100, batch_size: int = 32
) -> GenerativeScorer:
    """Constrained beam search over the model's item index; the items that ``split``'s ranking excludes
    (training items, plus validation items for the test split) are kept out of the search itself."""
    return GenerativeScorer(
        model,
        prompts_for(bundle, model),
        bundle.histories("train"),
        bundle.seen(split),
        beam=beam,
        batch_size=batch_size,
    )


PRIOR_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0)


def fit_prior(bundle: Bundle, model: CLLM4Rec) -> dict[str, float]:
    """Fit the model's collaborative prior on the training matrix (EASE, lambda chosen on valid by NDCG@100)."""
    from llmrec.baselines import EASE  # the classical models load only when a prior is asked for

    if model.config.prior != "ease":
        raise ValueError(f"unknown prior {model.config.prior!r}")
    ease = EASE().fit(bundle.matrix("train"), bundle.matrix("valid"))
    model.prior.fit(ease.weights)
    return {"lambda": ease.lam}


def choose_prior_weight(
    bundle: Bundle,
    model: CLLM4Rec,
    metric: str = "cllm4rec",
    batch_size: int = 64,
    weights: Sequence[float] = PRIOR_WEIGHTS,
) -> tuple[float, dict[float, float]]:
    """The blend weight of the prior with the best ``metric`` on valid; sets it on ``model.config``.

    The LM and the prior are scored once; each weight only re-blends the two (standardised) matrices.
    """
    scorer = scorer_for(bundle, model, batch_size)
    users = np.flatnonzero(np.diff(bundle.matrix("valid").indptr) > 0)
    logits, prior = scorer.parts(users)
    logits, prior = standardize(logits), standardize(prior)
    grid = {}
    for weight in weights:
        blend = PrecomputedScorer(logits + weight * prior, users)
        result = evaluate_scorer(blend, bundle, "valid", users=users, batch_size=batch_size, progress=False)
        grid[weight] = with_selection_metric(result)[metric]
    best = max(grid, key=grid.get)
    model.config = dataclasses.replace(model.config, prior_weight=best)
    return best, grid


def item_softmax(
    bundle: Bundle, mode: str = "full", chunk_size: int = 65536, num_samples: int = 8192
) -> ItemSoftmax:
    """The finetuning softmax; the sampled one draws negatives by training popularity (its log q)."""
    log_q = None
    if mode == "sampled":
        counts = np.asarray(bundle.matrix("train").sum(axis=0)).ravel() + 1.0
        log_q = torch.log(torch.as_tensor(counts / counts.sum(), dtype=torch.float32))
    return ItemSoftmax(mode, chunk_size=chunk_size, num_samples=num_samples, log_q=log_q)


def with_selection_metric(metrics: dict[str, float]) -> dict[str, float]:
    """Add CLLM4Rec's model-selection score, recall@20 + recall@40 + ndcg@100, where those are present."""
    if all(key in metrics for key in ("recall@20", "recall@40", "ndcg@100")):
        metrics["cllm4rec"] = metrics["recall@20"] + metrics["recall@40"] + metrics["ndcg@100"]
    return metrics


def evaluate_model(
    bundle: Bundle, model: CLLM4Rec, split: str, batch_size: int = 64, beam: int = 0, **kwargs
) -> dict[str, float]:
    """Full-catalogue metrics of ``model`` on ``split`` (seen items excluded), one forward pass per user.

    With ``beam`` > 0 the ranked lists come from constrained beam search of semantic IDs instead (the
    generative task); a list holds ``beam`` items, so ``beam`` must cover the largest cut-off.
    """
    if beam:
        largest = max(kwargs.get("ks", DEFAULT_KS))
        if beam < largest:
            raise ValueError(
                f"beam {beam} is shorter than the largest cut-off @{largest}: lists would be padded"
            )
        scorer = generative_scorer(bundle, model, split, beam, batch_size)
    else:
        scorer = scorer_for(bundle, model, batch_size)
    return with_selection_metric(evaluate_scorer(scorer, bundle, split, batch_size=batch_size, **kwargs))


def validation_fn(
    bundle: Bundle, batch_size: int = 64, beam: int = 0
) -> Callable[[CLLM4Rec], dict[str, float]]:
    return partial(evaluate_model, bundle, split="valid", batch_size=batch_size, beam=beam, progress=False)
