"""Write a finetuned model as a recommender bundle (the format `llmrec.recommender` reads).

``export_run`` takes a finetuning run directory, ``export_model`` a model and its dataset bundle; both
write the layout described in `llmrec.recommender` into a temporary directory and rename it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import string
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import transformers
from safetensors.torch import load_file, save_file

from common import __version__
from common.io import atomic_directory, read_json, sha256_file, write_json
from data_prep import Bundle, load_bundle
from llmrec.backbone import backbone_fingerprint
from llmrec.model import VIEWS, CLLM4Rec, run_model_dir
from llmrec.recommender import (
    ADAPTER_DIR,
    BUNDLE_FORMAT,
    CONFIG_FILE,
    DTYPES,
    FORMAT_VERSION,
    HEAD_FILE,
    HISTORIES_FILE,
    MERGED_DIR,
    MERGED_INFO_FILE,
    WEIGHTS_FILE,
    config_checksum,
)
from llmrec.tokens import export_plain_model

logger = logging.getLogger(__name__)

_USER_PLACEHOLDER = re.compile(r"\s*<[^<>{}]*\{user\}[^<>{}]*>\s*")


def cold_template(finetune_template: str) -> str:
    """The finetune template without its user placeholders: the prompt of a user unseen in training."""
    template = " ".join(_USER_PLACEHOLDER.sub(" ", finetune_template).split())
    _check_template(template, "cold", user=False)
    return template


def _check_template(template: str, name: str, user: bool) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    allowed = {"user", "history"} if user else {"history"}
    if "history" not in fields or not fields <= allowed:
        raise ValueError(
            f"{name} template {template!r} must contain {{history}} and no other field than {sorted(allowed)}"
        )


def export_run(run: str | Path, out: str | Path, data: str | Path | None = None, **options: Any) -> Path:
    """Export the model of a finetuning run (see :func:`run_model_dir`) with its dataset bundle.

    ``data`` defaults to the bundle recorded in ``RUN/run_config.json``; ``options`` go to
    :func:`export_model`.
    """
    run = Path(run)
    model_path = run_model_dir(run)
    if data is None:
        run_config = run / "run_config.json"
        if not run_config.is_file():
            raise FileNotFoundError(f"{run_config}: missing; pass the dataset bundle explicitly (--data)")
        data = read_json(run_config, "run config")["data"]
    model = CLLM4Rec.from_pretrained(model_path)
    source = {"run": str(run), "model": str(model_path), "data": str(data)}
    return export_model(model, load_bundle(data), out, source=source, **options)


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
) -> Path:
    """Write ``model`` (trained on the dataset bundle ``data``) as a recommender bundle at ``out``.

    ``dtype`` (fp32/fp16/bf16) is the dtype of every saved weight; ``cold`` overrides the cold-user
    template (default :func:`cold_template` of the finetune template). With ``merge`` the bundle also
    gets ``merged/`` (see the module docstring); merging folds LoRA into ``model``'s backbone, so
    ``model`` must not be used afterwards. Written to a temporary directory and renamed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    vocab = model.vocab
    if (vocab.n_users, vocab.n_items) != (data.n_users, data.n_items):
        raise ValueError(
            f"the model has {vocab.n_users} users and {vocab.n_items} items but the dataset bundle {data.path} "
            f"has {data.n_users} and {data.n_items}: export with the bundle the model was trained on"
        )
    if merge and (model.backbone.load_in_4bit or model.backbone.load_in_8bit):
        raise ValueError("--merge needs a full-precision backbone (this model was loaded in 4 or 8 bit)")
    if merge and (model.config.history_pool != "none" or model.config.prior != "none"):
        raise ValueError(
            "--merge writes a plain transformers model, which has no place for the history pool or the prior "
            "this model scores with: export without --merge"
        )
    templates = {"user": data.templates.finetune, "cold": cold or cold_template(data.templates.finetune)}
    _check_template(templates["user"], "finetune", user=True)
    _check_template(templates["cold"], "cold", user=False)
    torch_dtype = DTYPES[dtype]
    fingerprint = backbone_fingerprint(model.backbone)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        weights = {
            name: tensor.detach().to("cpu", torch_dtype).contiguous()
            for name, tensor in model.trainable_state_dict().items()
            if not name.startswith("lm.")  # LoRA goes to the peft adapter directory
        }
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        adapters = list(model.lm.peft_config)
        _save_adapters(model, tmp / ADAPTER_DIR, torch_dtype)
        data.catalogue.save(tmp)
        histories = data.histories("train")
        offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])]).astype(np.int64)
        items = np.fromiter((i for h in histories for i in h), dtype=np.int64, count=int(offsets[-1]))
        save_file(
            {"offsets": torch.from_numpy(offsets), "items": torch.from_numpy(items)},
            str(tmp / HISTORIES_FILE),
            metadata={"format": "pt"},
        )
        files = {
            path.relative_to(tmp).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(tmp.rglob("*"))
            if path.is_file()
        }
        backbone = dataclasses.replace(model.backbone, cache_dir=None, allow_download=False)
        config = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "llmrec_version": __version__,
            "library_versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
            "backbone": {
                "config": asdict(backbone),
                **fingerprint,
                "base_vocab_size": vocab.base_size,
                "hidden_size": int(model.collab.family_weight("item").shape[1]),
            },
            "model": asdict(model.config),
            "head": model.config.head,
            "vocab": vocab.to_dict(),
            "dtype": dtype,
            "adapters": adapters,
            "templates": templates,
            "source": {
                **(source or {}),
                "data": str(data.path),
                "dataset_counts": data.manifest.get("counts"),
            },
            "merged": MERGED_DIR if merge else None,
            "files": files,
        }
        config["checksum"] = config_checksum(config)
        write_json(tmp / CONFIG_FILE, config, ensure_ascii=False)
        if merge:
            _export_merged(model, tmp / MERGED_DIR, torch_dtype, templates)
    size = sum(record["bytes"] for record in files.values())
    logger.info("exported %s (%.1f MB without merged/)", out, size / 1e6)
    return Path(out)


def _save_adapters(model: CLLM4Rec, directory: Path, dtype: torch.dtype) -> None:
    """peft's own adapter directories, one per adapter, with the weights cast to ``dtype``."""
    model.lm.save_pretrained(str(directory))
    (directory / "README.md").unlink(missing_ok=True)  # peft's model card names local paths
    for path in directory.rglob("adapter_model.safetensors"):
        state = load_file(str(path))
        save_file(
            {k: v.to(dtype).contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"}
        )


def _export_merged(model: CLLM4Rec, directory: Path, dtype: torch.dtype, templates: dict[str, str]) -> None:
    """LoRA merged into the backbone, ID tokens as added tokens (:func:`export_plain_model`), plus the head."""
    head = {
        "weight": model.item_weight().detach().to("cpu", dtype).contiguous(),
        "bias": (
            model.head_bias.detach() if model.config.head == "untied" else torch.zeros(model.vocab.n_items)
        )
        .to("cpu", dtype)
        .contiguous(),
    }
    merged = model.lm.merge_and_unload(adapter_names=[VIEWS[0]]).to(dtype)
    export_plain_model(merged, model.tokenizer, model.vocab, model.collab, directory)
    save_file(head, str(directory / HEAD_FILE), metadata={"format": "pt"})
    write_json(
        directory / MERGED_INFO_FILE,
        {
            "templates": templates,
            "head": HEAD_FILE,
            "scoring": "scores = hidden_states[-1][:, last prompt position] @ weight.T + bias; "
            "column i is the item with index i (../items.json)",
        },
        ensure_ascii=False,
    )
