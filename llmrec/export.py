"""Export a finetuned model as a recommender bundle (the format of `llmrec.bundle`).

``export_run`` takes a finetuning run directory, which it reads once (`llmrec.run.Run`), ``export_model``
a model and its dataset bundle; both choose what goes in the bundle (templates, mapper, model card,
generator settings) and hand it to the format's one writer, `llmrec.bundle.write_bundle` (shared with
``Recommender.save_pretrained``; it also writes ``--merge``'s ``merged/``). A semantic-ID generator run
(task in `llmrec.pipeline.GENERATIVE_TASKS`) becomes a generator bundle: its item index, the prompt it trained
on and its evaluation beam, so that the bundle's lists are evaluation's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.artifacts import check_target
from common.errors import UserError
from data_prep import Bundle, load_bundle
from llmrec.bundle import DTYPES, RECOMMENDER, check_template, write_bundle
from llmrec.coldstart import warm_items
from llmrec.indexing.encoders import MINILM, item_embeddings
from llmrec.mapper import TextToID, item_texts
from llmrec.metrics import DEFAULT_KS, LOO_KS, is_leave_one_out
from llmrec.model import CLLM4Rec
from llmrec.model_card import model_card
from llmrec.pipeline import FINETUNE_TASKS, GENERATIVE_TASKS, prompt_template, require_same_catalogue
from llmrec.run import Run

logger = logging.getLogger(__name__)

_USER_PLACEHOLDER = re.compile(r"\s*<[^<>{}]*\{user\}[^<>{}]*>\s*")


def cold_template(finetune_template: str) -> str:
    """The finetune template without its user placeholders: the prompt of a user unseen in training."""
    template = " ".join(_USER_PLACEHOLDER.sub(" ", finetune_template).split())
    return check_template(template, "cold")


def export_run(run: str | Path, out: str | Path, data: str | Path | None = None, **options: Any) -> Path:
    """Export the model of a finetuning run (see `llmrec.run.run_model_dir`) with its dataset bundle.

    ``data`` defaults to the bundle recorded in ``RUN/run_config.json``; the prompt is the one the run's
    task trained on (``FINETUNE_TASKS``: a ``sequential`` run is served the chronological sequence
    prompt); ``options`` go to :func:`export_model`. A generator run (``GENERATIVE_TASKS``) is exported
    as a generator bundle whose ``beam`` (option ``beam``, default :func:`run_beam`) is the one its
    evaluation uses; an item-head run given a ``beam`` is refused.
    """
    record = Run.read(run)  # the run's records, read once: config, model directory, prior weight, metrics
    task = record.task
    if options.get("beam") is not None and task not in GENERATIVE_TASKS:
        raise UserError(
            f"--beam: {record.path} is an item-head run (task {task}); only a semantic-ID generator run "
            f"({', '.join(GENERATIVE_TASKS)}) ranks by beam search"
        )
    if data is None:
        data = record.data
    inputs = {"--run": record.path, "--data": data}
    check_target(out, RECOMMENDER, options.get("overwrite", False), inputs)  # before the model loads
    bundle = load_bundle(data)
    if task in GENERATIVE_TASKS and options.get("beam") is None:
        options["beam"] = run_beam(record, bundle)
    model = record.model()  # with the prior weight the run chose
    source = {"run": str(record.path), "model": str(record.model_dir), "data": str(data)}
    options.setdefault("prompt", FINETUNE_TASKS[task])
    return export_model(model, bundle, out, source=source, inputs=inputs, run=record, **options)


def run_beam(run: Run, data: Bundle) -> int:
    """The beam width a generator run is evaluated with: its ``eval.beam``, else (0) the largest metric
    cut-off of ``data``'s protocol (``recipes/finetune.py`` validation, ``recipes/evaluate.py``)."""
    return run.beam or max(LOO_KS if is_leave_one_out(data) else DEFAULT_KS)


def export_model(
    model: CLLM4Rec,
    data: Bundle,
    out: str | Path,
    *,
    dtype: str = "fp32",
    merge: bool = False,
    cold: str | None = None,
    overwrite: bool = False,
    source: dict[str, str] | None = None,
    mapper: bool = True,
    prompt: str = "masked",
    inputs: Mapping[str, str | Path | None] | None = None,
    beam: int | None = None,
    run: Run | None = None,
) -> Path:
    """Write ``model`` (trained on the dataset bundle ``data``) as a recommender bundle at ``out``.

    ``dtype`` (fp32/fp16/bf16) is the dtype of every saved weight; ``cold`` overrides the cold-user
    template (default :func:`cold_template` of the finetune template). With ``merge`` the bundle also
    gets ``merged/`` (`llmrec.bundle.write_merged`); merging folds LoRA into ``model``'s backbone, so
    ``model`` must not be used afterwards. With ``mapper`` the bundle carries the text-to-ID mapper of
    ``Recommender.add_items`` (:func:`fit_mapper`). ``prompt`` is the kind of prompt the model was
    finetuned on (`llmrec.pipeline.prompt_template`: ``masked`` or ``sequence``); known users are served
    with it. The bundle's ``README.md`` is its model card (`llmrec.model_card`: with the ``run``'s
    options and metrics when it comes from one, `llmrec.run.Run`). Written to a temporary directory and renamed; ``out`` may not be,
    contain or lie inside ``data`` or the other ``inputs`` (`common.artifacts`).

    With ``beam`` the bundle is a generator's (mode ``generate``, `llmrec.bundle`): ``model`` (trained
    on a semantic-ID generator task with ``prompt``) ranks by constrained beam search of that width over
    its item index, which the bundle carries as ``index/``; it has no item head to merge or mapper to fit
    (new items get codes from the index, ``Recommender.add_items``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    require_same_catalogue(data, model, "the model")
    generate = None
    if beam is not None:
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise UserError(f"--beam must be a positive whole number, got {beam!r}")
        if model.item_index is None:
            raise UserError("--beam: the model has no item index (semantic IDs), so it cannot generate")
        if merge:
            raise UserError("--merge writes the item head, which a semantic-ID generator does not rank with")
        generate = {"beam": beam, "prompt": prompt}
    if merge and (model.backbone.load_in_4bit or model.backbone.load_in_8bit):
        raise ValueError("--merge needs a full-precision backbone (this model was loaded in 4 or 8 bit)")
    if merge and not model.head.linear:
        raise ValueError(
            "--merge writes a plain transformers model, which has no place for the history pool or the prior "
            "this model scores with: export without --merge"
        )
    template = prompt_template(data, prompt)
    templates = {"user": template, "cold": cold or cold_template(template)}
    for name, value in templates.items():
        check_template(value, name)
    source = {**(source or {}), "data": str(data.path), "dataset_counts": data.manifest.get("counts")}
    text_mapper = fit_mapper(model, data) if mapper and generate is None else None
    card = model_card(
        data.manifest,
        {
            "backbone": asdict(model.backbone),
            "model": asdict(model.config),
            "templates": templates,
            "dtype": dtype,
            "generate": generate,
        },
        source,
        run,
    )
    return write_bundle(
        model,
        out,
        data.catalogue,
        data.histories("train"),
        templates,
        source,
        dtype=dtype,
        overwrite=overwrite,
        inputs={"--data": data.path, **(inputs or {})},
        mapper=text_mapper,
        merge=merge,
        card=card,
        generate=generate,
    )


def fit_mapper(model: CLLM4Rec, data: Bundle) -> TextToID | None:
    """The text-to-ID mapper fit on the warm items' texts (title and description), so that adding items
    to the bundle only encodes the new ones; the texts' MiniLM embeddings are read from or written to
    the dataset's cache (``DATA/embeddings``). None for a model with semantic IDs, whose new items need
    codes (a generator bundle takes them from its item index; an item-head bundle cannot add items)."""
    if model.vocab.semantic_codebooks:
        logger.info("no text-to-ID mapper: a model with semantic IDs adds items through its item index only")
        return None
    try:
        embeddings = item_embeddings(
            item_texts(data.item_titles, data.item_text), MINILM, cache_dir=Path(data.path) / "embeddings"
        )
    except ImportError as err:
        raise UserError(
            f"{err}; or export with --mapper false (add_items then fits it on first use)"
        ) from err
    return TextToID.fit(model, embeddings, warm_items(data.matrix("train"), data.n_items), MINILM)
