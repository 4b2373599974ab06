"""A finetuned recommender as a small, safe bundle, and :class:`Recommender`, the API that queries it.

Bundle layout (``export_model`` / ``python recipes/export.py``)::

    config.json            format + version, llmrec/library versions, backbone spec + fingerprint,
                           model config (head type, LoRA), ID-token vocabulary (families and sizes),
                           prompt templates, weight dtype, sha256 + size of every other file, and a
                           checksum of config.json's own content
    weights.safetensors    ID-token tables of both views (``collab.tables.*``, ``content.tables.*``)
                           and, for an untied head, ``head_weight``/``head_bias``
    adapter/<name>/        peft LoRA adapter(s) (adapter_config.json + adapter_model.safetensors)
    users.json             raw user ids by index
    items.json             raw item ids and titles by index
    histories.safetensors  every user's training items, oldest first (CSR: ``offsets``, ``items``)
    merged/                (``--merge`` only) a plain transformers model: LoRA merged, ID tokens as
                           added tokens, resized embeddings, plus ``item_head.safetensors``

The frozen backbone is not copied: the bundle names it (a :class:`BackboneConfig`) with a fingerprint of
the checkpoint it was trained on, and loading refuses a backbone whose fingerprint differs. Loading
reads JSON and safetensors only (no pickle) and never runs code from the bundle: a bundle asking for
``trust_remote_code`` is refused unless the caller passes it explicitly.

Prompts. A known user is scored exactly as evaluation scores them: the dataset's finetune template over
all their training items (``<user_u> has interacted with <item_a> <item_b>, <user_u> will interact
with``). A user unseen in training has no user token, so ``history=`` prompts use the *cold* template:
the finetune template with its user placeholders removed (``has interacted with <item_a> <item_b>,
will interact with``). The model never saw that prompt shape during finetuning, so cold scores are out
of distribution; they are a usable fallback, not what the model was selected for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import peft
import safetensors
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file, save_file

import llmrec
from data_prep import Bundle, load_bundle
from data_prep.bundle import atomic_directory
from llmrec.backbone import (
    GGUF_ALIASES,
    TINY_MODELS,
    TINY_SEED,
    BackboneConfig,
    byte_level_tokenizer,
    gguf_fingerprint,
    load_backbone,
)
from llmrec.coldstart import TextToID, extend_items, item_texts, parse_new_items
from llmrec.collate import FinetunePrompts
from llmrec.data import PromptScorer, train_histories
from llmrec.metrics import RankingMetrics
from llmrec.model import VIEWS, CLLM4Rec, ModelConfig
from llmrec.tokens import RecVocab, export_plain_model
from llmrec.train import run_model_dir

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "llmrec-recommender"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
ADAPTER_DIR = "adapter"
USERS_FILE = "users.json"
ITEMS_FILE = "items.json"
HISTORIES_FILE = "histories.safetensors"
MERGED_DIR = "merged"
HEAD_FILE = "item_head.safetensors"
MAPPER_FILE = "mapper.safetensors"
MERGED_INFO_FILE = "recommender.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONFIG_KEYS = ("backbone", "model", "vocab", "dtype", "adapters", "templates", "files", "checksum")
# Files of a local checkpoint that define it cheaply (weights are identified by name and size).
_CHECKPOINT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_USER_PLACEHOLDER = re.compile(r"\s*<[^<>{}]*\{user\}[^<>{}]*>\s*")


class BundleError(ValueError):
    """A recommender bundle that cannot be used; the message names the file and what is wrong."""


# --------------------------------------------------------------------------------------------------------------
# Backbone fingerprints


def backbone_fingerprint(config: BackboneConfig) -> dict[str, str | None]:
    """Identify the checkpoint ``config`` resolves to on this machine, without loading it.

    Returns ``{"kind", "fingerprint", "revision"}``. Built-in tiny models: a hash of their hyperparameters,
    seed and tokenizer. GGUF files (``smollm2-135m`` included): :func:`llmrec.backbone.gguf_fingerprint`,
    the same key that names the conversion cache. Local directories and hub snapshots: a hash of
    config.json and the tokenizer files plus the names and sizes of the weight files (cheap; an in-place
    edit of weights that keeps their size is not detected); for the hub, ``revision`` is the commit.
    """
    name = config.name_or_path
    if name in TINY_MODELS:
        spec = json.dumps([TINY_MODELS[name], TINY_SEED], sort_keys=True, default=lambda o: o.__qualname__)
        tokenizer = byte_level_tokenizer().backend_tokenizer.to_str()
        return {"kind": "tiny", "fingerprint": _digest(f"{spec}\0{tokenizer}".encode()), "revision": None}
    if name in GGUF_ALIASES:
        return {"kind": "gguf", "fingerprint": gguf_fingerprint(GGUF_ALIASES[name]()), "revision": None}
    if name.endswith(".gguf") and Path(name).is_file():
        return {"kind": "gguf", "fingerprint": gguf_fingerprint(Path(name)), "revision": None}
    if Path(name).is_dir():
        return {"kind": "local", "fingerprint": _checkpoint_digest(Path(name)), "revision": None}
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(
            snapshot_download(
                name, revision=config.revision, cache_dir=config.cache_dir, local_files_only=True
            )
        )
    except Exception as err:  # huggingface_hub raises several types for "not in the local cache"
        raise BundleError(
            f"backbone {name!r} is neither a built-in name, a *.gguf file, a local directory nor a hub model "
            f"in the local cache ({type(err).__name__}: {err})"
        ) from err
    return {"kind": "hub", "fingerprint": _checkpoint_digest(snapshot), "revision": snapshot.name}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _checkpoint_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in _CHECKPOINT_FILES:
        if (directory / name).is_file():
            digest.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
    for path in sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin")]):
        digest.update(f"{path.name}:{path.stat().st_size}\0".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Export


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
        data = json.loads(run_config.read_text(encoding="utf-8"))["data"]
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
    templates = {"user": data.templates.finetune, "cold": cold or cold_template(data.templates.finetune)}
    _check_template(templates["user"], "finetune", user=True)
    _check_template(templates["cold"], "cold", user=False)
    source = {**(source or {}), "data": str(data.path), "dataset_counts": data.manifest.get("counts")}
    catalogue = {"user_ids": data.user_ids, "item_ids": data.item_ids, "item_titles": data.item_titles}
    return write_bundle(
        model,
        out,
        histories=train_histories(data),
        templates=templates,
        source=source,
        dtype=dtype,
        merge=merge,
        overwrite=overwrite,
        **catalogue,
    )


def write_bundle(
    model: CLLM4Rec,
    out: str | Path,
    *,
    user_ids: Sequence[str],
    item_ids: Sequence[str],
    item_titles: Sequence[str],
    histories: Sequence[Sequence[int]],
    templates: dict[str, str],
    source: dict[str, Any],
    dtype: str = "fp32",
    merge: bool = False,
    overwrite: bool = False,
    item_texts: Sequence[str] | None = None,
    mapper: TextToID | None = None,
) -> Path:
    """Write the bundle files (see the module docstring); ``item_texts`` and ``mapper`` (the cold-item
    text-to-ID mapper) are optional extras that :meth:`Recommender.add_items` reads back."""
    torch_dtype = DTYPES[dtype]
    vocab = model.vocab
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
        _write_json(tmp / USERS_FILE, {"raw_ids": list(user_ids)})
        items_json = {"raw_ids": list(item_ids), "titles": list(item_titles)}
        if item_texts is not None:
            items_json["texts"] = list(item_texts)
        _write_json(tmp / ITEMS_FILE, items_json)
        if mapper is not None:
            mapper.save(tmp / MAPPER_FILE)
        offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])]).astype(np.int64)
        items = np.fromiter((i for h in histories for i in h), dtype=np.int64, count=int(offsets[-1]))
        save_file(
            {"offsets": torch.from_numpy(offsets), "items": torch.from_numpy(items)},
            str(tmp / HISTORIES_FILE),
            metadata={"format": "pt"},
        )
        files = {
            path.relative_to(tmp).as_posix(): _file_record(path)
            for path in sorted(tmp.rglob("*"))
            if path.is_file()
        }
        backbone = dataclasses.replace(model.backbone, cache_dir=None, allow_download=False)
        config = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "llmrec_version": llmrec.__version__,
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
            "source": source,
            "merged": MERGED_DIR if merge else None,
            "files": files,
        }
        config["checksum"] = _config_checksum(config)
        _write_json(tmp / CONFIG_FILE, config)
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
    _write_json(
        directory / MERGED_INFO_FILE,
        {
            "templates": templates,
            "head": HEAD_FILE,
            "scoring": "scores = hidden_states[-1][:, last prompt position] @ weight.T + bias; "
            "column i is the item with index i (../items.json)",
        },
    )


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _config_checksum(config: dict[str, Any]) -> str:
    content = {key: value for key, value in config.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Loading


def read_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a bundle, checked: format, version, its own checksum, and the required keys."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise BundleError(f"{directory}: no such bundle directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing; not a recommender bundle (write one with recipes/export.py)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a recommender bundle config (format is not {BUNDLE_FORMAT!r})")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format_version {version!r} (written by llmrec {config.get('llmrec_version')}) "
            f"cannot be read by llmrec {llmrec.__version__}, which reads format_version {FORMAT_VERSION}; "
            "use a matching llmrec version or export the run again"
        )
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise BundleError(f"{path}: missing key(s) {missing}")
    if config["checksum"] != _config_checksum(config):
        raise BundleError(
            f"{path}: edited after export (its checksum does not match its content); export the run again. "
            "Backbone load options (device, dtype, cache_dir, 4/8 bit) are arguments of "
            "Recommender.from_pretrained, not edits of this file"
        )
    return config


def verify_files(directory: str | Path, files: dict[str, dict[str, Any]]) -> None:
    """Every file listed in config.json is present, of the recorded size, with the recorded sha256."""
    directory = Path(directory)
    for name, record in files.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{path}: missing (listed in {CONFIG_FILE}); the bundle is incomplete")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise BundleError(
                f"{path}: {size} bytes, {CONFIG_FILE} records {record['bytes']}: truncated or replaced"
            )
        if _sha256(path) != record["sha256"]:
            raise BundleError(f"{path}: content differs from the sha256 in {CONFIG_FILE}: corrupted")


def _read_json_list(path: Path, key: str, length: int, required: bool = True) -> list[str] | None:
    data = json.loads(path.read_text(encoding="utf-8"))
    if key not in data and not required:
        return None
    values = data[key]
    if len(values) != length:
        raise BundleError(f"{path}: {len(values)} {key} but config.json's vocabulary says {length}")
    return [str(value) for value in values]


@dataclass(frozen=True)
class Recommendation:
    """One recommended item: raw id, catalogue index, title and score (the item head's logit)."""

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
    """

    def __init__(
        self,
        model: CLLM4Rec,
        user_ids: list[str],
        item_ids: list[str],
        item_titles: list[str],
        histories: Sequence[Sequence[int]],
        templates: dict[str, str],
        batch_size: int = 32,
        item_texts: list[str] | None = None,
        mapper: TextToID | None = None,
        dtype: str = "fp32",
    ):
        self.model, self.batch_size = model, batch_size
        self.user_ids, self.item_ids, self.item_titles = user_ids, item_ids, item_titles
        self.item_texts = item_texts if item_texts is not None else [""] * len(item_ids)
        self.user_index = {raw: index for index, raw in enumerate(user_ids)}
        self.item_index = {raw: index for index, raw in enumerate(item_ids)}
        self.histories = histories
        self.templates, self.mapper, self.dtype = templates, mapper, dtype
        self._build_prompts()

    def _build_prompts(self) -> None:
        """Prompt encoders over the model's current vocabulary (rebuilt when items are added)."""
        model, max_tokens = self.model, self.model.config.max_doc_tokens
        self.prompts = FinetunePrompts(
            model.vocab, model.tokenizer, self.templates["user"], max_tokens=max_tokens
        )
        self.cold_prompts = FinetunePrompts(
            model.vocab, model.tokenizer, self.templates["cold"], max_tokens=max_tokens
        )
        self._scorer = PromptScorer(model, self.prompts, self.histories, batch_size=self.batch_size)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        **backbone_overrides: Any,
    ) -> Recommender:
        """Rebuild backbone + LoRA adapter(s) + ID-token tables + head from a bundle.

        ``device`` defaults to CUDA when available. ``backbone_overrides`` are :class:`BackboneConfig`
        fields that change how the backbone loads (``cache_dir``, ``dtype``, ``load_in_4bit``, ...). The
        backbone must have the fingerprint recorded at export. ``trust_remote_code`` is never taken from
        the bundle.
        """
        directory = Path(directory)
        config = read_config(directory)
        verify_files(directory, config["files"])
        try:
            vocab = RecVocab.from_dict(config["vocab"])
            model_config = ModelConfig(**config["model"])
            saved_backbone = BackboneConfig(**config["backbone"]["config"])
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{directory / CONFIG_FILE}: invalid content ({err})") from err
        if saved_backbone.trust_remote_code and not trust_remote_code:
            raise BundleError(
                f"{directory / CONFIG_FILE}: the backbone {saved_backbone.name_or_path!r} needs "
                "trust_remote_code=True; pass it to from_pretrained only if you trust that model's code"
            )
        backbone = dataclasses.replace(
            saved_backbone, trust_remote_code=trust_remote_code, **backbone_overrides
        )
        found = backbone_fingerprint(backbone)
        expected = config["backbone"]["fingerprint"]
        if found["fingerprint"] != expected:
            raise BundleError(
                f"{directory}: backbone {backbone.name_or_path!r} on this machine ({found['kind']}, fingerprint "
                f"{found['fingerprint']}) is not the one the bundle was trained on ({config['backbone']['kind']}, "
                f"fingerprint {expected}); install or point to the original checkpoint"
            )
        user_ids = _read_json_list(directory / USERS_FILE, "raw_ids", vocab.n_users)
        item_ids = _read_json_list(directory / ITEMS_FILE, "raw_ids", vocab.n_items)
        titles = _read_json_list(directory / ITEMS_FILE, "titles", vocab.n_items)
        texts = _read_json_list(directory / ITEMS_FILE, "texts", vocab.n_items, required=False)
        mapper = TextToID.load(directory / MAPPER_FILE) if MAPPER_FILE in config["files"] else None
        histories = _read_histories(directory / HISTORIES_FILE, vocab)
        model = _load_model(directory, config, vocab, model_config, backbone)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device).eval()
        logger.info(
            "loaded recommender %s: %d users, %d items, backbone %s",
            directory,
            vocab.n_users,
            vocab.n_items,
            backbone.name_or_path,
        )
        return cls(
            model,
            user_ids,
            item_ids,
            titles,
            histories,
            config["templates"],
            batch_size=batch_size,
            item_texts=texts,
            mapper=mapper,
            dtype=config["dtype"],
        )

    # ------------------------------------------------------------------ ids
    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user(self, raw_id: str | int) -> int:
        """Index of a known user; a clear error for an id not seen in training."""
        return self._index(
            "user", raw_id, hint="; for a user unseen in training pass history=[item ids] instead"
        )

    def items(self, raw_ids: Sequence[str | int]) -> list[int]:
        """Indices of catalogue items; a clear error naming the first unknown id and its position."""
        return [self._index("item", raw, where=f" at position {pos}") for pos, raw in enumerate(raw_ids)]

    def _index(self, kind: str, raw_id: str | int, where: str = "", hint: str = "") -> int:
        index_of, ids = (
            (self.user_index, self.user_ids) if kind == "user" else (self.item_index, self.item_ids)
        )
        index = index_of.get(str(raw_id))
        if index is None:
            examples = ", ".join(repr(raw) for raw in ids[:3])
            raise ValueError(
                f"unknown {kind} id {str(raw_id)!r}{where}: not one of the {len(ids)} {kind}s of this bundle "
                f"(e.g. {examples}){hint}"
            )
        return index

    def history(self, user: str | int) -> list[str]:
        """A known user's training items (raw ids, oldest first): their prompt and their seen items."""
        return [self.item_ids[i] for i in self.histories[self.user(user)]]

    # ------------------------------------------------------------------ catalogue
    def add_items(self, items: Iterable[Mapping[str, Any]] | Any) -> list[int]:
        """Add items nobody has interacted with, from their text, without retraining; returns their indices.

        ``items``: a list of ``{"id": str, "title": str, "text": str (optional)}`` dicts, or a pandas
        DataFrame with those columns. Each new item gets every ID-token row from the text-to-ID mapper
        (``llmrec.coldstart.TextToID``: MiniLM embedding -> rows, fit on the items with a training
        history the first time and kept by :meth:`save_pretrained`), so the item head ranks new and old
        items together and a new item may appear in ``history=[...]``. Existing items keep their rows, so
        their scores do not change.
        """
        new = parse_new_items(items, self.item_index)
        if self.mapper is None:
            warm = np.unique(np.concatenate([np.asarray(h, dtype=np.int64) for h in self.histories]))
            texts = item_texts(self.item_titles, self.item_texts)
            self.mapper = TextToID.fit_on_texts(self.model, texts, warm)
        embeddings = self.mapper.embed(item_texts([n["title"] for n in new], [n["text"] for n in new]))
        indices = list(extend_items(self.model, len(new)))
        self.mapper.apply(self.model, indices, embeddings)
        for index, item in zip(indices, new, strict=True):
            self.item_ids.append(item["id"])
            self.item_titles.append(item["title"])
            self.item_texts.append(item["text"])
            self.item_index[item["id"]] = index
        self._build_prompts()
        logger.info("added %d items (%d in the catalogue)", len(new), self.n_items)
        return indices

    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write this recommender, added items and mapper included, as a bundle that
        :meth:`from_pretrained` loads."""
        return write_bundle(
            self.model,
            directory,
            user_ids=self.user_ids,
            item_ids=self.item_ids,
            item_titles=self.item_titles,
            item_texts=self.item_texts,
            histories=self.histories,
            templates=self.templates,
            source={"saved_by": "Recommender.save_pretrained"},
            dtype=self.dtype,
            overwrite=overwrite,
            mapper=self.mapper,
        )

    # ------------------------------------------------------------------ scores
    def score(
        self, user: str | int | None = None, *, history: Sequence[str | int] | None = None
    ) -> torch.Tensor:
        """Scores of the whole catalogue (n_items,) for one known user or one history; column i = item_ids[i]."""
        users, histories = _one(user, history)
        return self.score_batch(users, histories=histories)[0]

    def score_batch(
        self,
        users: Sequence[str | int] | None = None,
        *,
        histories: Sequence[Sequence[str | int]] | None = None,
    ) -> torch.Tensor:
        """Scores (batch, n_items) for many known users, or for many histories of unseen users."""
        if (users is None) == (histories is None):
            raise ValueError("give either users (known user ids) or histories (lists of item ids), not both")
        if len(users if users is not None else histories) == 0:
            return torch.empty(0, self.n_items)
        if users is not None:
            return self._scorer(np.asarray([self.user(u) for u in users], dtype=np.int64))
        indexed = [self._cold_history(h, row) for row, h in enumerate(histories)]
        scorer = PromptScorer(self.model, self.cold_prompts, indexed, batch_size=self.batch_size)
        return scorer(np.arange(len(indexed)))

    def _cold_history(self, history: Sequence[str | int], row: int) -> list[int]:
        if isinstance(history, (str, bytes)):
            raise ValueError(f"history {row} is a string; pass a list of item ids")
        if len(history) == 0:
            raise ValueError(
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

    def recommend_batch(
        self,
        users: Sequence[str | int] | None = None,
        *,
        histories: Sequence[Sequence[str | int]] | None = None,
        k: int = 10,
        exclude_seen: bool = True,
        exclude: Sequence[Sequence[str | int]] | None = None,
    ) -> list[list[Recommendation]]:
        """Top ``k`` lists for many known users or many histories (one forward pass per prompt)."""
        if k < 1:
            raise ValueError(f"k must be a positive number of items, got {k}")
        scores = self.score_batch(users, histories=histories)
        if exclude is not None and len(exclude) != len(scores):
            raise ValueError(f"exclude has {len(exclude)} lists for {len(scores)} users")
        masked = scores.clone()
        for row in range(len(scores)):
            drop = self.items(exclude[row]) if exclude is not None else []
            if exclude_seen and users is not None:
                drop += list(self.histories[self.user(users[row])])
            elif exclude_seen:
                drop += self.items(histories[row])
            masked[row, drop] = float("-inf")
        k = min(k, self.n_items)
        top = RankingMetrics(self.n_items, ks=(k,)).topk(masked, k)
        return [
            [
                Recommendation(self.item_ids[i], i, self.item_titles[i], float(masked[row, i]))
                for i in top[row].tolist()
                if masked[row, i] > float("-inf")
            ]
            for row in range(len(scores))
        ]


def _one(user, history) -> tuple[list | None, list | None]:
    if (user is None) == (history is None):
        raise ValueError("give either user (a known user id) or history (a list of item ids), not both")
    return ([user], None) if user is not None else (None, [history])


def _read_histories(path: Path, vocab: RecVocab) -> list[np.ndarray]:
    try:
        state = load_file(str(path))
        offsets, items = state["offsets"].numpy(), state["items"].numpy()
    except (OSError, KeyError, safetensors.SafetensorError) as err:
        raise BundleError(f"{path}: cannot read the training histories ({err})") from err
    if len(offsets) != vocab.n_users + 1 or offsets[-1] != len(items) or np.any(np.diff(offsets) < 0):
        raise BundleError(f"{path}: offsets do not describe {vocab.n_users} users over {len(items)} items")
    if len(items) and (items.min() < 0 or items.max() >= vocab.n_items):
        raise BundleError(f"{path}: item indices outside [0, {vocab.n_items})")
    return np.split(items, offsets[1:-1])


def _load_model(
    directory: Path,
    config: dict[str, Any],
    vocab: RecVocab,
    model_config: ModelConfig,
    backbone: BackboneConfig,
) -> CLLM4Rec:
    lm, tokenizer = load_backbone(backbone)
    for param in lm.parameters():
        param.requires_grad_(False)
    rows = lm.get_input_embeddings().weight.shape[0]
    if rows != vocab.base_size:
        raise BundleError(
            f"{directory}: backbone {backbone.name_or_path!r} has {rows} embedding rows, the bundle's "
            f"vocabulary was built on {vocab.base_size}"
        )
    adapters = config["adapters"]
    expected = list(VIEWS if model_config.lora_per_view else VIEWS[:1])
    if adapters != expected:
        raise BundleError(
            f"{directory / CONFIG_FILE}: adapters {adapters}, this model config needs {expected}"
        )
    try:
        lm = PeftModel.from_pretrained(
            lm, str(directory / ADAPTER_DIR / adapters[0]), adapter_name=adapters[0]
        )
        for name in adapters[1:]:
            lm.load_adapter(str(directory / ADAPTER_DIR / name), adapter_name=name)
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as err:
        raise BundleError(f"{directory / ADAPTER_DIR}: cannot load the LoRA adapter ({err})") from err
    # the tables are overwritten below; a normal init needs no titles
    build_config = dataclasses.replace(model_config, embedding_init="normal")
    model = CLLM4Rec(lm, tokenizer, vocab, build_config, backbone)
    model.config = model_config  # report the config it was trained with (re-exports keep it)
    try:
        model.load_trainable(directory / WEIGHTS_FILE)
    except ValueError as err:
        raise BundleError(str(err)) from err
    return model
