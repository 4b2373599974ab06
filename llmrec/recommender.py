"""A finetuned recommender as a small, safe bundle: its format, its verification, and :class:`Recommender`.

This is the serving side; its :func:`write_bundle` is the one writer of the format, used by
`llmrec.export` (from a training run) and :meth:`Recommender.save_pretrained`. Importing it loads no model code:
transformers, peft and the model load when a bundle does (``from_pretrained``), and never the training
stack (`llmrec.train`, `llmrec.collate`, `llmrec.generate`, `data_prep`).

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
    merged/                (``--merge`` only) a plain transformers model: LoRA merged, ID tokens as
                           added tokens, resized embeddings, plus ``item_head.safetensors``
    index/                 (generator bundles only) the item index: ``index.json``, ``codes.safetensors``
                           and its artifacts (`llmrec.indexing.ItemIndex`; the RQ-VAE or RQ-KMeans
                           weights that code ``add_items``' new items)

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

Modes. ``config.json``'s ``mode`` says how the bundle ranks: ``item_head`` (format_version 1, and every
bundle without ``mode``) scores the whole catalogue with the item head; ``generate`` (format_version 2,
exported from a semantic-ID generator run, task in `llmrec.data.GENERATIVE_TASKS`) ranks by the
constrained beam search of evaluation (`llmrec.decoding.GenerativeScorer`) over the bundle's ``index/``,
with ``generate = {"beam": width, "prompt": kind}``: the run's evaluation beam and the prompt kind it
trained on (``semantic_sequence`` writes each history item as its codes, `llmrec.decoding.SemanticPrompts`).
Generator bundles carry their own format version so that an llmrec that reads only format 1 refuses them
instead of serving the item head a generator run never trained.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import string
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors
import torch
from safetensors.torch import load_file, save_file

from common import __version__, io
from common.artifacts import Kind, recover, write_directory
from common.catalogue import Catalogue, id_sequence
from common.errors import UserError
from common.io import ArtifactError, file_records, read_json, write_json
from llmrec.metrics import RankingMetrics
from llmrec.options import WEIGHT_DTYPES
from llmrec.prompts import FinetunePrompts
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
# CPU threads of add_items: encoding ~100 short texts (a few tens of GFLOP) and growing a few tables gain
# little from more threads, and on a busy CPU extra threads wait for each other (README, Cold start)
ADD_ITEMS_THREADS = 1
DTYPES = dict(zip(WEIGHT_DTYPES, (torch.float32, torch.float16, torch.bfloat16), strict=True))
CONFIG_KEYS = ("backbone", "model", "vocab", "dtype", "adapters", "templates", "files", "checksum")


class BundleError(ArtifactError):
    """A recommender bundle that cannot be used; the message names the file and what is wrong."""


def _is_bundle_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == BUNDLE_FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


# a directory --overwrite may replace: one whose config.json is a recommender bundle's, not any model's
RECOMMENDER = Kind("recommender bundle", CONFIG_FILE, check=_is_bundle_config)


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
    merged: Callable[[Path], None] | None = None,
    card: str | None = None,
    generate: Mapping[str, Any] | None = None,
) -> Path:
    """Write the bundle files (see the module docstring) into a temporary directory and rename it.

    ``card`` is the Markdown of the bundle's ``README.md`` (`llmrec.model_card`, written by an export).
    ``generate`` (``{"beam", "prompt"}``, see the module docstring) writes a generator bundle: mode
    ``generate``, format_version 2, ``model.item_index`` as ``index/``.

    ``mapper`` (the cold-item text-to-ID mapper) is an optional extra that :meth:`Recommender.add_items`
    reads back; ``merged(directory)`` writes the ``merged/`` directory (`llmrec.export`, ``--merge``),
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
        if merged is not None:
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
        if merged is not None:
            merged(tmp / MERGED_DIR)
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
            "merged": MERGED_DIR if merged is not None else None,
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
        from llmrec.backbone import backbone_fingerprint
        from llmrec.model import ModelConfig

        directory = Path(directory)
        config = read_config(directory)
        config_path = directory / CONFIG_FILE
        verify_files(directory, config["files"], hashes=verify)
        unlisted = [name for name in required_files(config) if name not in config["files"]]
        if unlisted:
            raise BundleError(
                f"does not list {unlisted} among its files: incomplete bundle", file=config_path
            )
        templates = check_templates(config["templates"], config_path)
        generate = None
        if bundle_mode(config) == GENERATE:
            generate = check_generate(config.get("generate"), config_path)
            if beam is not None:
                if isinstance(beam, bool) or not isinstance(beam, int) or not 1 <= beam <= MAX_BEAM:
                    raise UserError(f"beam must be a whole number in [1, {MAX_BEAM}], got {beam!r}")
                generate["beam"] = beam
        elif beam is not None:
            raise UserError(
                f"{directory}: beam= is for a generator bundle; this one ranks with the item head"
            )
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
        histories = _read_histories(directory / HISTORIES_FILE, vocab)
        mapper = None
        if MAPPER_FILE in config["files"]:
            from llmrec.mapper import TextToID

            mapper = TextToID.load(directory / MAPPER_FILE)
        index = read_index(directory, config, vocab) if generate is not None else None
        model = _load_model(directory, config, vocab, model_config, backbone)
        model.item_index = index
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
            catalogue,
            histories,
            templates,
            batch_size=batch_size,
            mapper=mapper,
            dtype=config["dtype"],
            kv_users=kv_users,
            generate=generate,
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
        evaluation (`llmrec.data.generative_scorer`)."""
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
