"""ID-token vocabulary: user, item and semantic-ID tokens above a frozen base vocabulary.

Why not ``tokenizer.add_tokens``: a tokenizer with 100k+ added tokens matches every text against
its added-token trie and slows tokenization by orders of magnitude (see
``benchmarks/tokenize_speed.py``). Instead, :class:`RecVocab` splits prompt text on placeholders
(``<user_3>``, ``<item_7>``, ``<s0_12>``) with one compiled regular expression, maps each
placeholder to its id arithmetically and sends only the word parts to the tokenizer, in one
batched call. :class:`RecEmbedding` looks the new ids up in their own trainable tables next to
the frozen base table, so LoRA plus these tables are the only trained parameters.
`llmrec.plain_model.export_plain_model` is the explicit path to a plain HF model whose tokenizer knows
the added tokens.

Whitespace rules of :meth:`RecVocab.encode` (chosen so that placeholders behave like words):
a word part keeps its leading whitespace (``" has interacted with"`` after ``<user_3>``
tokenizes as mid-sentence text), trailing whitespace right before a placeholder is dropped,
and whitespace-only parts give no tokens. This is what a tokenizer gives for added tokens with
``lstrip=True`` (the export path writes them that way), except that whitespace after the last
placeholder of a text is dropped too.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common import placeholders
from common.io import write_json
from llmrec.id_tables import FULL_TABLE, UserTableSpec, materialize, reset_table

FAMILIES = ("user", "item", "semantic")
VOCAB_FILE = "rec_vocab.json"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z_]*\Z")


@dataclasses.dataclass(frozen=True)
class TokenNames:
    """Placeholder name prefixes: ``<{user}_3>``, ``<{item}_7>``, ``<{semantic}{level}_{code}>``."""

    user: str = placeholders.USER
    item: str = placeholders.ITEM
    semantic: str = placeholders.SEMANTIC

    def __post_init__(self) -> None:
        names = dataclasses.astuple(self)
        for name in names:
            if not _NAME_RE.match(name):
                raise ValueError(f"token name prefix {name!r} must be letters/underscores (no digits)")
        if len(set(names)) != len(names):
            raise ValueError(f"token name prefixes must differ, got {names}")


class RecVocab:
    """The ID-token families, their id ranges above the base vocabulary, and placeholder <-> id maps.

    Layout (contiguous, never overlapping the base ids ``0..base_size-1``)::

        [base_size, +n_users)            user tokens
        [.., +n_items)                   item tokens
        [.., +sum(semantic_codebooks))   semantic tokens, level-major (level 0 codes first)

    ``base_size`` is the number of rows of the backbone's input embedding table (which may exceed
    ``len(tokenizer)`` when a model pads its vocabulary).
    """

    def __init__(
        self,
        base_size: int,
        n_users: int,
        n_items: int,
        semantic_codebooks: Sequence[int] = (),
        names: TokenNames = TokenNames(),
    ) -> None:
        if base_size <= 0 or n_users < 0 or n_items < 0:
            raise ValueError(f"bad sizes: base_size={base_size}, n_users={n_users}, n_items={n_items}")
        if any(int(k) <= 0 for k in semantic_codebooks):
            raise ValueError(f"semantic codebook sizes must be positive, got {list(semantic_codebooks)}")
        self.base_size = int(base_size)
        self.n_users = int(n_users)
        self.n_items = int(n_items)
        self.semantic_codebooks = tuple(int(k) for k in semantic_codebooks)
        self.names = names
        self._user_start = self.base_size
        self._item_start = self._user_start + self.n_users
        self._sem_start = self._item_start + self.n_items
        self._level_starts = np.concatenate([[0], np.cumsum(self.semantic_codebooks, dtype=np.int64)])
        self.total_size = self._sem_start + int(self._level_starts[-1])
        self._pattern = placeholders.pattern(names.user, names.item, names.semantic)

    # ------------------------------------------------------------------ ids
    def __repr__(self) -> str:
        return (
            f"RecVocab(base_size={self.base_size}, n_users={self.n_users}, n_items={self.n_items}, "
            f"semantic_codebooks={self.semantic_codebooks}, total_size={self.total_size})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecVocab) and self.to_dict() == other.to_dict()

    def family_range(self, name: str) -> range:
        """Token ids of one family (``user``, ``item`` or ``semantic``); empty when absent."""
        if name == "user":
            return range(self._user_start, self._item_start)
        if name == "item":
            return range(self._item_start, self._sem_start)
        if name == "semantic":
            return range(self._sem_start, self.total_size)
        raise ValueError(f"unknown token family {name!r}; expected one of {FAMILIES}")

    def families(self) -> dict[str, range]:
        """The families present (non-empty), in id order."""
        return {name: self.family_range(name) for name in FAMILIES if len(self.family_range(name))}

    def level_range(self, level: int) -> range:
        """Token ids of one semantic level."""
        if not 0 <= level < len(self.semantic_codebooks):
            raise ValueError(f"semantic level {level} out of range (levels: {len(self.semantic_codebooks)})")
        start = self._sem_start + int(self._level_starts[level])
        return range(start, start + self.semantic_codebooks[level])

    def user_token(self, u: int) -> int:
        if not 0 <= u < self.n_users:
            raise ValueError(f"user index {u} out of range [0, {self.n_users})")
        return self._user_start + u

    def item_token(self, i: int) -> int:
        if not 0 <= i < self.n_items:
            raise ValueError(f"item index {i} out of range [0, {self.n_items})")
        return self._item_start + i

    def semantic_token(self, level: int, code: int) -> int:
        levels = self.level_range(level)
        if not 0 <= code < len(levels):
            raise ValueError(f"code {code} out of range [0, {len(levels)}) at semantic level {level}")
        return levels.start + code

    # ------------------------------------------------------------ placeholders
    def placeholder(self, token_id: int) -> str:
        """The placeholder text of a new token id (``<user_3>``, ``<item_7>``, ``<s0_12>``)."""
        n = self.names
        if self._user_start <= token_id < self._item_start:
            return placeholders.placeholder(n.user, token_id - self._user_start)
        if self._item_start <= token_id < self._sem_start:
            return placeholders.placeholder(n.item, token_id - self._item_start)
        if self._sem_start <= token_id < self.total_size:
            offset = token_id - self._sem_start
            level = int(np.searchsorted(self._level_starts, offset, side="right")) - 1
            return placeholders.semantic_placeholder(
                n.semantic, level, offset - int(self._level_starts[level])
            )
        raise ValueError(
            f"token id {token_id} is not an ID token (range [{self.base_size}, {self.total_size}))"
        )

    def placeholders(self) -> list[str]:
        """Every placeholder in id order (for the export path; O(total new tokens))."""
        return [self.placeholder(t) for t in range(self.base_size, self.total_size)]

    def _placeholder_id(self, user: str | None, item: str | None, level: str | None, index: str) -> int:
        """Id of one parsed placeholder (the regex groups); out-of-range indices name the placeholder."""
        i = int(index)
        if user is not None:
            if i < self.n_users:
                return self._user_start + i
            text, err = placeholders.placeholder(user, i), f"user index {i} out of range [0, {self.n_users})"
        elif item is not None:
            if i < self.n_items:
                return self._item_start + i
            text, err = placeholders.placeholder(item, i), f"item index {i} out of range [0, {self.n_items})"
        else:
            text = placeholders.semantic_placeholder(self.names.semantic, int(level), i)
            try:
                return self.semantic_token(int(level), i)
            except ValueError as error:
                err = str(error)
        raise ValueError(f"placeholder {text!r}: {err}")

    def _split(self, text: str) -> list[str | int]:
        """Text -> word parts (str, whitespace rules applied) and new token ids (int), in order."""
        # re.split with the 4 groups gives [words, user, item, level, index, words, ...] in one C call
        pieces = self._pattern.split(text)
        parts: list[str | int] = []
        for k in range(0, len(pieces) - 1, 5):
            words = pieces[k].rstrip()
            if words:
                parts.append(words)
            parts.append(self._placeholder_id(*pieces[k + 1 : k + 5]))
        tail = pieces[-1]
        if tail and not (len(pieces) > 1 and tail.isspace()):
            parts.append(tail)
        return parts

    def encode(self, text: str, tokenizer: Any) -> list[int]:
        """Token ids of a text with placeholders; the tokenizer sees only the word parts."""
        return self.encode_batch([text], tokenizer)[0]

    def encode_batch(self, texts: Iterable[str], tokenizer: Any) -> list[list[int]]:
        """Like :meth:`encode` for many texts: each distinct word part is tokenized once, in one call.

        Prompts built from templates repeat the same few word parts (" has interacted with"), so
        deduplicating them removes most of the tokenizer work.
        """
        split = [self._split(text) for text in texts]
        words = list(dict.fromkeys(p for parts in split for p in parts if isinstance(p, str)))
        table = dict(zip(words, _tokenize(tokenizer, words), strict=True))
        out = []
        for parts in split:
            ids: list[int] = []
            for p in parts:
                if isinstance(p, int):
                    ids.append(p)
                else:
                    ids.extend(table[p])
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int], tokenizer: Any, **decode_kwargs: Any) -> str:
        """Ids -> text: base runs through ``tokenizer.decode``, new ids as placeholders.

        A placeholder is separated from what precedes it by one space, so ``decode(encode(t))``
        gives ``t`` for texts written in that canonical form.
        """
        out: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                out.append(tokenizer.decode(run, **decode_kwargs))
                run.clear()

        for t in ids:
            t = int(t)
            if t < self.base_size:
                run.append(t)
                continue
            flush()
            if out and not out[-1][-1:].isspace():
                out.append(" ")
            out.append(self.placeholder(t))
        flush()
        return "".join(out)

    # ------------------------------------------------------------- save/load
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "base_size": self.base_size,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "semantic_codebooks": list(self.semantic_codebooks),
            "names": dataclasses.asdict(self.names),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecVocab:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported RecVocab format_version {data.get('format_version')!r}")
        return cls(
            data["base_size"],
            data["n_users"],
            data["n_items"],
            data["semantic_codebooks"],
            TokenNames(**data["names"]),
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``rec_vocab.json`` into ``directory`` (created if needed) atomically."""
        return write_json(Path(directory) / VOCAB_FILE, self.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RecVocab:
        path = Path(directory) / VOCAB_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(data)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{path}: no RecVocab saved here") from err
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid RecVocab file: {err}") from err


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts in one call, without special tokens.

    A fast tokenizer's Rust backend is called directly: transformers' BatchEncoding conversion
    costs more than the tokenization itself for short word parts.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


class RecEmbedding(nn.Module):
    """Frozen base embedding table + one trainable table per ID-token family.

    The base module is held by reference and deliberately not registered as a submodule: it
    belongs to the backbone (which moves/casts it), and keeping it out of this module's
    ``state_dict`` keeps saved/exported weights to the new tables only (and avoids saving the
    same tensor twice). ``forward`` is loop- and sync-free: one lookup per family, merged with
    ``torch.where``.

    ``users`` chooses how the user family is stored (`llmrec.id_tables`: a full table, none, hashed or
    low-rank rows, optionally with sparse gradients); the other families are full tables.

    Init options (``init``):
      - ``"normal"``: every table ~ N(0, std²), ``std`` defaulting to the std of the base table.
      - ``"title_mean"``: item rows = mean base embedding of the item's title tokens (needs
        ``titles`` and ``tokenizer``), other tables normal.
      - ``"semantic_sum"``: item rows = sum of the item's semantic code embeddings (needs
        ``item_index``, anything with ``.codes`` of shape (n_items, levels), -1 = padding).

    ``code_init="title_mean"`` starts each semantic-ID code at the mean title embedding of the items
    that hold it at its level, minus that level's mean over all items (what sets the code apart; the
    plain means of ~n/K titles are nearly equal), at the normal init's scale (needs ``titles``,
    ``tokenizer`` and ``item_index``): the LM then reads a code as the kind of movie it stands for, as
    ``title_mean`` does for item tokens, instead of learning every code from noise.
    """

    def __init__(
        self,
        base: nn.Embedding,
        vocab: RecVocab,
        init: str = "normal",
        *,
        code_init: str = "normal",
        std: float | None = None,
        titles: Sequence[str] | None = None,
        tokenizer: Any = None,
        item_index: Any = None,
        dtype: torch.dtype = torch.float32,
        freeze_base: bool = True,
        seed: int = 0,
        users: UserTableSpec = FULL_TABLE,
    ) -> None:
        super().__init__()
        if base.weight.shape[0] != vocab.base_size:
            raise ValueError(
                f"base table has {base.weight.shape[0]} rows but vocab.base_size={vocab.base_size}"
            )
        object.__setattr__(self, "_base", base)  # a reference, not a submodule (see class docstring)
        if freeze_base:
            base.weight.requires_grad_(False)
        self.vocab = vocab
        hidden = base.weight.shape[1]
        device = base.weight.device
        self.tables = nn.ModuleDict(
            {
                name: users.build(len(ids), hidden, device, dtype)
                if name == "user"
                else nn.Embedding(len(ids), hidden, device=device, dtype=dtype)
                for name, ids in vocab.families().items()
            }
        )
        self.reset_parameters(
            init,
            code_init=code_init,
            std=std,
            titles=titles,
            tokenizer=tokenizer,
            item_index=item_index,
            seed=seed,
        )

    @property
    def base(self) -> nn.Embedding:
        return self._base

    def family_weight(self, name: str) -> torch.Tensor:
        """The trainable table of one family (rows in family order: user u is row u); full tables only."""
        if name not in self.tables:
            raise ValueError(f"no {name!r} table; families present: {list(self.tables)}")
        if not isinstance(self.tables[name], nn.Embedding):
            raise ValueError(f"the {name!r} family is not a full table; use family_rows")
        return self.tables[name].weight

    def family_rows(self, name: str) -> torch.Tensor:
        """Every row of one family, (family size, hidden), whatever table stores it (computed for hashed,
        low-rank and shared user tables)."""
        return materialize(self.tables[name], len(self.vocab.family_range(name)))

    @torch.no_grad()
    def reset_parameters(
        self,
        init: str = "normal",
        *,
        code_init: str = "normal",
        std: float | None = None,
        titles: Sequence[str] | None = None,
        tokenizer: Any = None,
        item_index: Any = None,
        seed: int = 0,
    ) -> None:
        """(Re)initialise the family tables; see the class docstring for the options."""
        if init not in ("normal", "title_mean", "semantic_sum"):
            raise ValueError(f"unknown init {init!r}; expected normal, title_mean or semantic_sum")
        if code_init not in ("normal", "title_mean"):
            raise ValueError(f"unknown code_init {code_init!r}; expected normal or title_mean")
        base_w = self.base.weight
        if std is None:
            std = float(base_w.float().std())
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for table in self.tables.values():
            reset_table(table, gen, std)
        if code_init == "title_mean":  # before semantic_sum, which sums the codes
            if titles is None or tokenizer is None or item_index is None:
                raise ValueError("code_init='title_mean' needs titles, tokenizer and item_index")
            self._init_codes_from_titles(titles, tokenizer, item_index, std)
        if init == "title_mean":
            if titles is None or tokenizer is None:
                raise ValueError("init='title_mean' needs titles and tokenizer")
            self._init_items_from_titles(titles, tokenizer)
        elif init == "semantic_sum":
            if item_index is None:
                raise ValueError("init='semantic_sum' needs item_index")
            self._init_items_from_codes(item_index)

    def _item_table(self) -> torch.Tensor:
        if "item" not in self.tables:
            raise ValueError("the vocabulary has no item tokens to initialise")
        return self.tables["item"].weight

    def _title_means(self, titles: Sequence[str], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_items, hidden) mean base embedding of each title's tokens, and which titles are non-empty."""
        n_items = len(self.vocab.family_range("item"))
        if len(titles) != n_items:
            raise ValueError(f"{len(titles)} titles for {n_items} items")
        device = self.base.weight.device
        ids = _tokenize(tokenizer, list(titles))
        lengths = torch.tensor([len(x) for x in ids])
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.long, device=device)
        if len(flat) and int(flat.max()) >= self.vocab.base_size:
            raise ValueError("title tokens fall outside the base vocabulary")
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]]).to(device)
        means = F.embedding_bag(flat, self.base.weight.float(), offsets, mode="mean")
        return means, (lengths > 0).to(device)

    def _init_items_from_titles(self, titles: Sequence[str], tokenizer: Any) -> None:
        item_w = self._item_table()
        means, has_title = self._title_means(titles, tokenizer)  # empty titles keep their normal init
        item_w.copy_(torch.where(has_title[:, None], means.to(item_w.dtype), item_w))

    def _init_codes_from_titles(
        self, titles: Sequence[str], tokenizer: Any, item_index: Any, std: float
    ) -> None:
        codes = self._checked_codes(item_index)
        means, has_title = self._title_means(titles, tokenizer)
        sem_w = self.tables["semantic"].weight
        for level in range(codes.shape[1]):
            held = (codes[:, level] >= 0).to(sem_w.device) & has_title
            if not bool(held.any()):
                continue
            vectors = means[held] - means[held].mean(0)  # what sets an item apart within its level
            rows = codes[held.cpu(), level].to(sem_w.device)
            size = self.vocab.semantic_codebooks[level]
            sums = torch.zeros(size, sem_w.shape[1], device=sem_w.device).index_add_(0, rows, vectors)
            counts = torch.zeros(size, device=sem_w.device).index_add_(0, rows, torch.ones(len(rows)))
            mean_rows = sums / counts.clamp_min(1)[:, None]
            rms = mean_rows.pow(2).mean(-1, keepdim=True).sqrt()
            # a code no titled item holds, or that every item holds (nothing sets it apart), stays normal
            used = (counts > 0) & (rms[:, 0] > 1e-6 * std)
            start = int(self.vocab._level_starts[level])
            block = sem_w[start : start + size]
            block[used] = (mean_rows[used] * (std / rms[used])).to(sem_w.dtype)

    def _checked_codes(self, item_index: Any) -> torch.Tensor:
        """The index's (n_items, levels) codes, checked against the vocabulary's semantic family."""
        n_items = len(self.vocab.family_range("item"))
        if "semantic" not in self.tables:
            raise ValueError("a semantic-ID init needs semantic tokens in the vocabulary")
        codes = torch.as_tensor(np.asarray(item_index.codes), dtype=torch.long)
        if codes.ndim != 2 or codes.shape[0] != n_items:
            raise ValueError(f"item_index.codes has shape {tuple(codes.shape)}, expected ({n_items}, levels)")
        if codes.shape[1] > len(self.vocab.semantic_codebooks):
            raise ValueError(
                f"{codes.shape[1]} code levels but {len(self.vocab.semantic_codebooks)} in the vocab"
            )
        sizes = torch.tensor(self.vocab.semantic_codebooks[: codes.shape[1]])
        if bool((codes >= sizes).any()):
            raise ValueError("item_index.codes exceed the vocab's semantic codebook sizes")
        return codes

    def _init_items_from_codes(self, item_index: Any) -> None:
        item_w = self._item_table()
        codes = self._checked_codes(item_index)
        level_starts = torch.as_tensor(self.vocab._level_starts[: codes.shape[1]], dtype=torch.long)
        valid = codes >= 0
        rows = torch.where(valid, codes + level_starts, 0).to(item_w.device)
        sem = self.tables["semantic"].weight[rows] * valid.to(item_w.device)[..., None]
        item_w.copy_(sem.sum(1))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., hidden) in the base dtype; ids must lie in ``[0, vocab.total_size)``."""
        out = self.base(torch.where(input_ids < self.vocab.base_size, input_ids, 0))
        for name, table in self.tables.items():
            ids = self.vocab.family_range(name)
            inside = (input_ids >= ids.start) & (input_ids < ids.stop)
            rows = table((input_ids - ids.start).clamp(0, len(ids) - 1))
            out = torch.where(inside[..., None], rows.to(out.dtype), out)
        return out

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The base table and every family table stacked in id order: (total_size, hidden)."""
        rows = [self.family_rows(name).to(self.base.weight.dtype) for name in self.tables]
        return torch.cat([self.base.weight, *rows])
