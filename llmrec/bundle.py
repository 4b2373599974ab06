"""The export bundle format: one module writes it (:func:`write_bundle`) and reads it (:func:`read_bundle`).

The serving side (`llmrec.recommender.Recommender`) loads bundles through :func:`read_bundle` and writes
extended ones (added items) through :func:`write_bundle`; `llmrec.export` writes them from a training run
through the same writer. Importing this module loads no model code: transformers, peft and the model
load when a bundle does, and never the training stack (`llmrec.train`, `llmrec.collate`,
`llmrec.generate`, `data_prep`).

Bundle layout (`llmrec.export.export_model` / ``python recipes/export.py``)::

    config.json            format + version, llmrec/library versions, backbone spec + fingerprint,
                           model config (head type, LoRA), ID-token vocabulary (families and sizes),
                           prompt templates, weight dtype, sha256 + size of every other file, and a
                           checksum of config.json's own content
    weights.safetensors    ID-token tables of both views (``collab.tables.*``, ``content.tables.*``)
                           and the item head's (``head.*``, `llmrec.head.ItemHead`)
    adapter/<name>/        peft LoRA adapter(s) (adapter_config.json + adapter_model.safetensors)
    users.json             raw user ids by index
    items.json             raw item ids and titles by index (and texts, after ``add_items``)
    histories.safetensors  every user's training items, oldest first (CSR: ``offsets``, ``items``)
    README.md              the model card (export only): data and split, recipe, metrics, use
    mapper.safetensors     the text-to-ID mapper of ``add_items`` (`llmrec.mapper.TextToID`), fit at
                           export (unless ``--mapper false``) or by the first ``add_items``
    merged/                (``--merge`` only) a plain transformers model (`llmrec.plain_model`): LoRA
                           merged, ID tokens as added tokens, resized embeddings, plus
                           ``item_head.safetensors`` and ``recommender.json`` (:func:`write_merged`)
    index/                 (generator bundles only) the item index: ``index.json``, ``codes.safetensors``
                           and its artifacts (`llmrec.indexing.ItemIndex`; the RQ-VAE or RQ-KMeans
                           weights that code ``add_items``' new items)

The frozen backbone is not copied: the bundle names it (a :class:`BackboneConfig`) with a fingerprint of
the checkpoint it was trained on, and loading refuses a backbone whose fingerprint differs. Loading
reads JSON and safetensors only (no pickle) and never runs code from the bundle: a bundle asking for
``trust_remote_code`` is refused unless the caller passes it explicitly.

Modes. ``config.json``'s ``mode`` says how the bundle ranks: ``item_head`` (format_version 1, and every
bundle without ``mode``) scores the whole catalogue with the item head; ``generate`` (format_version 2,
exported from a semantic-ID generator run, task in `llmrec.pipeline.GENERATIVE_TASKS`) ranks by the
constrained beam search of evaluation (`llmrec.decoding.GenerativeScorer`) over the bundle's ``index/``,
with ``generate = {"beam": width, "prompt": kind}``: the run's evaluation beam and the prompt kind it
trained on (``semantic_sequence`` writes each history item as its codes, `llmrec.decoding.SemanticPrompts`).
Generator bundles carry their own format version so that an llmrec that reads only format 1 refuses them
instead of serving the item head a generator run never trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors
import torch
from safetensors.torch import load_file, save_file

from common import __version__, io
from common.artifacts import Kind, recover, write_directory
from common.catalogue import Catalogue
from common.errors import UserError
from common.io import ArtifactError, file_records, read_json, write_json
from llmrec.options import WEIGHT_DTYPES
from llmrec.tokens import RecVocab

if TYPE_CHECKING:
    from llmrec.backbone import BackboneConfig
    from llmrec.indexing.base import ItemIndex
    from llmrec.mapper import TextToID
    from llmrec.model import CLLM4Rec, ModelConfig

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "llmrec-recommender"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
ADAPTER_DIR = "adapter"
HISTORIES_FILE = "histories.safetensors"
MERGED_DIR = "merged"
HEAD_FILE = "item_head.safetensors"
MERGED_INFO_FILE = "recommender.json"
MAPPER_FILE = "mapper.safetensors"
CARD_FILE = "README.md"
INDEX_DIR = "index"
# how a bundle ranks (config.json "mode"; absent: item_head) and the format version each is written with
ITEM_HEAD, GENERATE = "item_head", "generate"
MODE_VERSIONS = {ITEM_HEAD: FORMAT_VERSION, GENERATE: 2}
MAX_BEAM = 10_000  # a bound on a bundle's beam width (evaluation uses 20-100)
DTYPES = dict(zip(WEIGHT_DTYPES, (torch.float32, torch.float16, torch.bfloat16), strict=True))
CONFIG_KEYS = ("backbone", "model", "vocab", "dtype", "adapters", "templates", "files", "checksum")


class BundleError(ArtifactError):
    """A recommender bundle that cannot be used; the message names the file and what is wrong."""


# a directory --overwrite may replace: one whose config.json is a recommender bundle's, not any model's
RECOMMENDER = Kind("recommender bundle", CONFIG_FILE, marker_format=BUNDLE_FORMAT)


def config_checksum(config: dict[str, Any]) -> str:
    """sha256 of config.json's content without its own ``checksum`` key (detects hand edits)."""
    content = {key: value for key, value in config.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a bundle, checked: format, version, its own checksum, and the required keys."""
    path = Path(directory) / CONFIG_FILE
    recover(directory)  # an export killed while renaming leaves the old or new bundle beside it
    if not Path(directory).is_dir():
        raise BundleError(f"{directory}: no such bundle directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing; not a recommender bundle (write one with recipes/export.py)")
    try:
        config = read_json(path, "bundle config")
    except ArtifactError as err:
        raise BundleError(str(err)) from err
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a recommender bundle config (format is not {BUNDLE_FORMAT!r})")
    version = config.get("format_version")
    if version not in MODE_VERSIONS.values():
        raise BundleError(
            f"{path}: bundle format_version {version!r} (written by llmrec {config.get('llmrec_version')}) "
            f"cannot be read by llmrec {__version__}, which reads format_version {FORMAT_VERSION} (item head) "
            f"and {MODE_VERSIONS[GENERATE]} (semantic-ID generator): re-export the run with llmrec "
            f"{__version__} (format_version {FORMAT_VERSION}, or {MODE_VERSIONS[GENERATE]} for a generator run; "
            "python recipes/export.py --run RUN --out DIR) or load it with the llmrec that wrote it"
        )
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise BundleError(f"{path}: missing key(s) {missing}")
    if config["checksum"] != config_checksum(config):
        raise BundleError(
            f"{path}: edited after export (its checksum does not match its content); export the run again. "
            "Backbone load options (device, dtype, cache_dir, 4/8 bit) are arguments of "
            "Recommender.from_pretrained, not edits of this file"
        )
    mode = bundle_mode(config)
    if mode not in MODE_VERSIONS:
        raise BundleError(f"{path}: unknown 'mode' {mode!r}; expected one of {list(MODE_VERSIONS)}")
    if version != MODE_VERSIONS[mode]:
        raise BundleError(
            f"{path}: a {mode} bundle is format_version {MODE_VERSIONS[mode]}, this one says {version}"
        )
    return config


def bundle_mode(config: dict[str, Any]) -> str:
    """How a bundle ranks: ``config.json``'s ``mode`` (``item_head`` when absent, as in llmrec 0.1-0.2)."""
    return config.get("mode", ITEM_HEAD)


def check_generate(value: object, path: Path) -> dict[str, Any]:
    """A generator bundle's ``generate`` entry: ``{"beam": 1..MAX_BEAM, "prompt": a prompt kind}``."""
    from llmrec.options import PROMPT_KINDS

    if not isinstance(value, dict) or set(value) != {"beam", "prompt"}:
        raise BundleError("'generate' must map exactly ['beam', 'prompt']", file=path)
    beam, prompt = value["beam"], value["prompt"]
    if isinstance(beam, bool) or not isinstance(beam, int) or not 1 <= beam <= MAX_BEAM:
        raise BundleError(
            f"'generate.beam' must be a whole number in [1, {MAX_BEAM}], got {beam!r}", file=path
        )
    if prompt not in PROMPT_KINDS:
        raise BundleError(f"'generate.prompt' must be one of {list(PROMPT_KINDS)}, got {prompt!r}", file=path)
    return {"beam": beam, "prompt": prompt}


# the fields each prompt template may use: known users' prompts name the user, cold ones only the history
TEMPLATE_FIELDS = {"user": {"user", "history"}, "cold": {"history"}}
MAX_TEMPLATE_CHARS = 10_000


def check_template(template: object, name: str) -> str:
    """A prompt template a bundle may carry: ``{history}``, plain fields of ``TEMPLATE_FIELDS[name]``
    only, no conversion or format spec (``{user:>9999}`` would pad every prompt), bounded length. A
    :class:`UserError` says what is wrong."""
    allowed = TEMPLATE_FIELDS[name]
    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
        raise UserError(f"{name} template must be a string of at most {MAX_TEMPLATE_CHARS} characters")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise UserError(f"{name} template {template!r} is not a format string ({err})") from err
    fields = set()
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in allowed or spec or conversion:
            raise UserError(
                f"{name} template {template!r}: field {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not allowed; use only {sorted(allowed)}, without "
                "conversions or format specs"
            )
        fields.add(field)
    if "history" not in fields:
        raise UserError(f"{name} template {template!r} must contain {{history}}")
    return template


def check_templates(templates: object, path: Path) -> dict[str, str]:
    """A bundle's ``templates`` (known users' and cold users' prompts), each checked by :func:`check_template`."""
    if not isinstance(templates, dict) or set(templates) != set(TEMPLATE_FIELDS):
        raise BundleError(f"'templates' must map exactly {sorted(TEMPLATE_FIELDS)} to prompts", file=path)
    try:
        return {name: check_template(templates[name], name) for name in TEMPLATE_FIELDS}
    except UserError as err:
        raise BundleError(str(err), file=path) from err


# backbone options that are places on the loader's disk or network access: never taken from a bundle
LOADER_OPTIONS = {"cache_dir": None, "allow_download": False}


def saved_backbone(config: dict[str, Any], path: Path) -> BackboneConfig:
    """The bundle's backbone, without the options that are the loader's choice (``LOADER_OPTIONS``): a
    bundle cannot choose where a converted backbone is written or read from, nor allow downloads."""
    from llmrec.backbone import BackboneConfig

    saved = config["backbone"]["config"]
    if not isinstance(saved, dict):
        raise BundleError("'backbone.config' is not a mapping", file=path)
    ignored = sorted(key for key, value in LOADER_OPTIONS.items() if saved.get(key, value) != value)
    if ignored:
        logger.warning(
            "%s: ignoring the bundle's backbone %s (the loader's choice)", path, ", ".join(ignored)
        )
    return BackboneConfig(**{**saved, **LOADER_OPTIONS})


def required_files(config: dict[str, Any]) -> list[str]:
    """The files the loader opens: each must be listed (sized and hashed) in config.json. (A generator
    bundle's index artifacts are named in ``index/index.json``; :func:`read_index` checks them.)"""
    from llmrec.indexing.base import CODES_FILE, INDEX_FILE

    adapters = config["adapters"] if isinstance(config["adapters"], list) else []
    per_adapter = ("adapter_config.json", "adapter_model.safetensors")
    index = (
        [f"{INDEX_DIR}/{INDEX_FILE}", f"{INDEX_DIR}/{CODES_FILE}"] if bundle_mode(config) == GENERATE else []
    )
    return [
        WEIGHTS_FILE,
        HISTORIES_FILE,
        "users.json",
        "items.json",
        *(f"{ADAPTER_DIR}/{name}/{file}" for name in adapters for file in per_adapter),
        *index,
    ]


def read_index(directory: Path, config: dict[str, Any], vocab: RecVocab) -> ItemIndex:
    """A generator bundle's ``index/``, after :func:`verify_files`: every artifact ``index.json`` names must
    be one of the bundle's listed files (so nothing unverified, and nothing outside the bundle, is read),
    and the codes must fit the vocabulary (one distinct tuple per item, the model's codebooks)."""
    from llmrec.indexing.base import INDEX_FILE, ItemIndex

    meta_path = directory / INDEX_DIR / INDEX_FILE
    try:
        meta = read_json(meta_path, "item index")
    except ArtifactError as err:
        raise BundleError(str(err)) from err
    artifacts = meta.get("artifacts") if isinstance(meta, dict) else None
    if not isinstance(artifacts, list):
        raise BundleError("'artifacts' must be a list of file names", file=meta_path)
    unlisted = [name for name in artifacts if f"{INDEX_DIR}/{name}" not in config["files"]]
    if unlisted:
        raise BundleError(
            f"names artifact(s) {unlisted[:3]} that {CONFIG_FILE} does not list among the bundle's files",
            file=meta_path,
        )
    try:
        index = ItemIndex.read(directory / INDEX_DIR)  # no recovery: the verified files as they are
    except (OSError, ValueError, safetensors.SafetensorError) as err:
        raise BundleError(f"{directory / INDEX_DIR}: cannot read the item index ({err})") from err
    if index.n_items != vocab.n_items or index.codebook_sizes != vocab.semantic_codebooks:
        raise BundleError(
            f"holds {index.n_items} items with codebooks {list(index.codebook_sizes)}; the model has "
            f"{vocab.n_items} items and semantic codebooks {list(vocab.semantic_codebooks)}",
            file=meta_path,
        )
    if not index.is_unique():
        raise BundleError(
            "two items share a code tuple: the generator could not tell them apart", file=meta_path
        )
    return index


def verify_files(directory: str | Path, files: dict[str, dict[str, Any]], hashes: bool = True) -> None:
    """Every file listed in config.json is present, of the recorded size and (with ``hashes``) the
    recorded sha256."""
    directory = Path(directory)
    try:
        io.verify_files(directory, files, directory / CONFIG_FILE, hashes=hashes)
    except ArtifactError as err:
        raise BundleError(err.reason, file=err.file) from err


def require_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN or infinite weights (a diverged run, or an overflow in the export dtype) by name, so
    that a broken model never gets a bundle with fresh, valid checksums."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BundleError(
                f"{where}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf) of {tensor.numel()}; "
                "the run diverged or the dtype overflows: export another checkpoint or use --dtype fp32"
            )


def write_bundle(
    model: CLLM4Rec,
    out: str | Path,
    catalogue: Catalogue,
    histories: Sequence[Sequence[int]],
    templates: dict[str, str],
    source: dict[str, Any],
    *,
    dtype: str = "fp32",
    overwrite: bool = False,
    inputs: Mapping[str, str | Path | None] | None = None,
    mapper: TextToID | None = None,
    merge: bool = False,
    card: str | None = None,
    generate: Mapping[str, Any] | None = None,
) -> Path:
    """The one writer of the format: the bundle files (see the module docstring) into a temporary
    directory, renamed in when complete (`common.artifacts.write_directory`); `llmrec.export` (from a
    training run) and ``Recommender.save_pretrained`` (an extended bundle) call it.

    ``card`` is the Markdown of the bundle's ``README.md`` (`llmrec.model_card`, written by an export).
    ``generate`` (``{"beam", "prompt"}``, see the module docstring) writes a generator bundle: mode
    ``generate``, format_version 2, ``model.item_index`` as ``index/``.

    ``mapper`` (the cold-item text-to-ID mapper) is an optional extra that ``Recommender.add_items``
    reads back; ``merge`` writes the ``merged/`` directory (:func:`write_merged`; ``--merge`` of
    `llmrec.export`, which folds LoRA into ``model``'s backbone, so ``model`` must not be used afterwards),
    whose files config.json lists and checksums like the others. Non-finite weights are refused.
    ``overwrite`` replaces only a recommender bundle, and never one of ``inputs`` (`common.artifacts`).
    """
    import peft
    import transformers

    from llmrec.backbone import backbone_fingerprint

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    torch_dtype, vocab = DTYPES[dtype], model.vocab
    mode = GENERATE if generate is not None else ITEM_HEAD
    if generate is not None:
        generate = check_generate(dict(generate), Path(out) / CONFIG_FILE)
        if model.item_index is None or model.item_index.n_items != vocab.n_items:
            raise ValueError("a generator bundle needs the model's item index, with one code tuple per item")
        if merge:
            raise ValueError(
                "a generator bundle has no merged/ (it holds the item head, which generation does not use)"
            )
    if (catalogue.n_users, catalogue.n_items) != (vocab.n_users, vocab.n_items):
        raise ValueError(
            f"the catalogue has {catalogue.n_users} users and {catalogue.n_items} items, the model "
            f"{vocab.n_users} and {vocab.n_items}"
        )
    fingerprint = backbone_fingerprint(model.backbone)
    trainable = {name: t.detach().to("cpu", torch_dtype) for name, t in model.trainable_state_dict().items()}
    require_finite(trainable, f"the model to export (as {dtype})")
    with write_directory(out, RECOMMENDER, overwrite=overwrite, inputs=inputs) as tmp:
        weights = {
            name: tensor.contiguous()
            for name, tensor in trainable.items()
            if not name.startswith("lm.")  # LoRA goes to the peft adapter directory
        }
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        adapters = list(model.lm.peft_config)
        _save_adapters(model, tmp / ADAPTER_DIR, torch_dtype)
        catalogue.save(tmp)
        if mapper is not None:
            mapper.save(tmp / MAPPER_FILE)
        offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])]).astype(np.int64)
        items = np.fromiter((i for h in histories for i in h), dtype=np.int64, count=int(offsets[-1]))
        save_file(
            {"offsets": torch.from_numpy(offsets), "items": torch.from_numpy(items)},
            str(tmp / HISTORIES_FILE),
            metadata={"format": "pt"},
        )
        if merge:
            write_merged(model, tmp / MERGED_DIR, torch_dtype, templates)
        if generate is not None:
            model.item_index.write_files(tmp / INDEX_DIR)
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        files = file_records(tmp)
        backbone = dataclasses.replace(model.backbone, cache_dir=None, allow_download=False)
        config = {
            "format": BUNDLE_FORMAT,
            "format_version": MODE_VERSIONS[mode],
            "llmrec_version": __version__,
            "mode": mode,
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
            **({"generate": generate} if generate is not None else {}),
            "files": files,
        }
        config["checksum"] = config_checksum(config)
        write_json(tmp / CONFIG_FILE, config, ensure_ascii=False)
    size = sum(record["bytes"] for name, record in files.items() if not name.startswith(f"{MERGED_DIR}/"))
    logger.info("wrote %s (%.1f MB without merged/)", out, size / 1e6)
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


def write_merged(model: CLLM4Rec, directory: Path, dtype: torch.dtype, templates: dict[str, str]) -> None:
    """``merged/``: LoRA merged into the backbone, ID tokens as added tokens (the plain model format,
    `llmrec.plain_model.export_plain_model`), plus the item head (``HEAD_FILE``) and how to score with it
    (``MERGED_INFO_FILE``)."""
    from llmrec.model import VIEWS
    from llmrec.plain_model import export_plain_model

    head = {
        "weight": model.item_weight().detach().to("cpu", dtype).contiguous(),
        "bias": (model.head.bias.detach() if model.head.untied else torch.zeros(model.vocab.n_items))
        .to("cpu", dtype)
        .contiguous(),
    }
    merged = model.lm.merge_and_unload(adapter_names=[VIEWS[0]]).to(dtype)
    require_finite(
        {**merged.state_dict(), **{f"item_head.{k}": v for k, v in head.items()}}, "the merged model"
    )
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


def read_histories(path: Path, vocab: RecVocab) -> list[np.ndarray]:
    """``histories.safetensors``: every user's training items (CSR ``offsets``, ``items``), checked."""
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


def load_model(
    directory: Path,
    config: dict[str, Any],
    vocab: RecVocab,
    model_config: ModelConfig,
    backbone: BackboneConfig,
) -> CLLM4Rec:
    """The bundle's model: the backbone, peft's adapter(s) from ``adapter/`` and the trained tables and
    head from ``weights.safetensors`` (`CLLM4Rec.restore`)."""
    from peft import PeftModel

    from llmrec.backbone import load_backbone
    from llmrec.model import VIEWS, CLLM4Rec

    lm, tokenizer = load_backbone(backbone)
    lm.requires_grad_(False)  # no k-bit preparation: serving trains nothing
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
    try:
        model = CLLM4Rec.restore(lm, tokenizer, vocab, model_config, backbone, directory / WEIGHTS_FILE)
    except ValueError as err:
        raise BundleError(str(err)) from err
    return model


@dataclass
class LoadedBundle:
    """A bundle read back (:func:`read_bundle`): the model (on the CPU, with its item index for a
    generator) and what a ``Recommender`` serves with it."""

    model: CLLM4Rec
    catalogue: Catalogue
    histories: list[np.ndarray]
    templates: dict[str, str]
    mapper: TextToID | None
    dtype: str
    generate: dict[str, Any] | None  # a generator's {"beam", "prompt"}, None for the item head


def read_bundle(
    directory: str | Path,
    trust_remote_code: bool = False,
    verify: bool = True,
    beam: int | None = None,
    **backbone_overrides: Any,
) -> LoadedBundle:
    """The one reader of the format: ``config.json`` (:func:`read_config`), every listed file against its
    size and sha256 (``verify=False``: sizes only), the templates, the catalogue, the histories, the
    mapper, a generator's item index (:func:`read_index`) and the model (:func:`load_model`), whose
    backbone must have the fingerprint recorded at export. ``trust_remote_code`` is never taken from the
    bundle; ``beam`` replaces a generator bundle's beam width (refused for an item-head bundle);
    ``backbone_overrides`` change how the backbone loads (``Recommender.from_pretrained``)."""
    from llmrec.backbone import backbone_fingerprint
    from llmrec.model import ModelConfig

    directory = Path(directory)
    config = read_config(directory)
    config_path = directory / CONFIG_FILE
    verify_files(directory, config["files"], hashes=verify)
    unlisted = [name for name in required_files(config) if name not in config["files"]]
    if unlisted:
        raise BundleError(f"does not list {unlisted} among its files: incomplete bundle", file=config_path)
    templates = check_templates(config["templates"], config_path)
    generate = None
    if bundle_mode(config) == GENERATE:
        generate = check_generate(config.get("generate"), config_path)
        if beam is not None:
            if isinstance(beam, bool) or not isinstance(beam, int) or not 1 <= beam <= MAX_BEAM:
                raise UserError(f"beam must be a whole number in [1, {MAX_BEAM}], got {beam!r}")
            generate["beam"] = beam
    elif beam is not None:
        raise UserError(f"{directory}: beam= is for a generator bundle; this one ranks with the item head")
    try:
        vocab = RecVocab.from_dict(config["vocab"])
        model_config = ModelConfig(**config["model"])
        backbone = saved_backbone(config, config_path)
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{config_path}: invalid content ({err})") from err
    if backbone.trust_remote_code and not trust_remote_code:
        raise BundleError(
            f"{config_path}: the backbone {backbone.name_or_path!r} needs "
            "trust_remote_code=True; pass it to from_pretrained only if you trust that model's code"
        )
    backbone = dataclasses.replace(backbone, trust_remote_code=trust_remote_code, **backbone_overrides)
    try:
        found = backbone_fingerprint(backbone)
    except OSError as err:
        raise BundleError(f"{directory}: {err}") from err
    expected = config["backbone"]["fingerprint"]
    if found["fingerprint"] != expected:
        raise BundleError(
            f"{directory}: backbone {backbone.name_or_path!r} on this machine ({found['kind']}, fingerprint "
            f"{found['fingerprint']}) is not the one the bundle was trained on ({config['backbone']['kind']}, "
            f"fingerprint {expected}); install or point to the original checkpoint"
        )
    try:
        catalogue = Catalogue.load(directory, vocab.n_users, vocab.n_items)
    except ArtifactError as err:
        raise BundleError(str(err)) from err
    histories = read_histories(directory / HISTORIES_FILE, vocab)
    mapper = None
    if MAPPER_FILE in config["files"]:
        from llmrec.mapper import TextToID

        mapper = TextToID.load(directory / MAPPER_FILE)
    index = read_index(directory, config, vocab) if generate is not None else None
    model = load_model(directory, config, vocab, model_config, backbone)
    model.item_index = index
    return LoadedBundle(model, catalogue, histories, templates, mapper, config["dtype"], generate)
