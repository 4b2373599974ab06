"""LC-Rec's text-to-ID alignment tasks, mixed into semantic-ID finetuning so that what the LM knows about
the titles reaches the codes.

Three kinds of example (the wording is fixed here: one short English sentence each, as LC-Rec's):

- ``title_to_id``: ``The item "Toy Story (1995)" has the ID`` -> the item's codes (task ``semantic``,
  the per-level code softmax);
- ``id_to_title``: ``The item with the ID <s0_a> <s1_b> <s2_c> is titled`` -> the title's words (task
  ``semantic_title``: next-word loss in the collaborative view, whose code embeddings the generator uses);
- ``titles_to_id``: ``<user_u> has watched "t1", "t2", ... and next`` -> the codes of the item that came
  after those titles (task ``semantic``); the cut is drawn per ``(seed, epoch, user)`` and the newest
  titles that fit ``max_tokens`` are kept.

The mixing weight is a share of rows: every epoch draws ``round(weight * main_rows / 3)`` rows of each
kind (a fresh draw from ``(seed, epoch)``), so one epoch trains ``weight`` times as many text-ID rows as
main-task rows, and the number of rows (and batches) is the same every epoch, which resuming relies on.
Why not a loss weight: the training loop normalises every one-task batch by its own token count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from llmrec.collate import epoch_rng, lm_example
from llmrec.indexing.base import ItemIndex
from llmrec.prompts import TASKS
from llmrec.tokens import RecVocab

KINDS = ("title_to_id", "id_to_title", "titles_to_id")


class TextIDDataset(Dataset):
    """``3 * per_kind`` rows per epoch, ``per_kind`` of each kind in :data:`KINDS` (see the module docstring)."""

    def __init__(
        self,
        titles: Sequence[str],
        histories: Sequence[Sequence[int]],
        vocab: RecVocab,
        tokenizer,
        index: ItemIndex,
        per_kind: int,
        seed: int = 0,
        max_tokens: int = 128,
    ):
        self.vocab, self.tokenizer, self.seed, self.max_tokens, self.epoch = (
            vocab,
            tokenizer,
            seed,
            max_tokens,
            0,
        )
        self.per_kind = per_kind
        self.first_semantic = vocab.family_range("semantic").start
        self.codes = [[int(t) for t in row if t >= 0] for row in index.token_ids(vocab)]
        self.titles = [self._words(f' "{title}"') for title in titles]
        self.users = [user for user, items in enumerate(histories) if len(items) >= 2]
        self.histories = [list(histories[user]) for user in self.users]

    def _words(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 3 * self.per_kind

    def task(self, index: int) -> int:
        return TASKS.index("semantic_title" if KINDS[index // self.per_kind] == "id_to_title" else "semantic")

    def length(self, index: int) -> int:
        return self.max_tokens if KINDS[index // self.per_kind] == "titles_to_id" else 24

    def _pick(self, index: int, pool: int) -> tuple[int, np.random.Generator]:
        """The pool row of ``index`` this epoch (a permutation per kind, cycled) and the row's generator."""
        kind, row = divmod(index, self.per_kind)
        order = np.random.default_rng((self.seed, self.epoch, 2, kind)).permutation(pool)
        return int(order[row % pool]), epoch_rng(self.seed, self.epoch, index)

    def _codes_example(self, prompt: list[int], item: int) -> dict:
        codes = self.codes[item]
        input_ids, labels = lm_example(prompt, codes, [t - self.first_semantic for t in codes])
        return {"task": TASKS.index("semantic"), "input_ids": input_ids, "labels": labels}

    def __getitem__(self, index: int) -> dict:
        kind = KINDS[index // self.per_kind]
        if kind == "title_to_id":
            item, _ = self._pick(index, len(self.titles))
            prompt = self._words("The item") + self.titles[item] + self._words(" has the ID")
            return self._codes_example(prompt, item)
        if kind == "id_to_title":
            item, _ = self._pick(index, len(self.titles))
            prompt = self._words("The item with the ID") + self.codes[item] + self._words(" is titled")
            input_ids, labels = lm_example(prompt, self.titles[item], self.titles[item])
            return {"task": TASKS.index("semantic_title"), "input_ids": input_ids, "labels": labels}
        row, rng = self._pick(index, len(self.users))
        history = self.histories[row]
        cut = int(rng.integers(1, len(history)))
        head = [self.vocab.user_token(self.users[row]), *self._words(" has watched")]
        tail = self._words(" and next")
        budget = self.max_tokens - len(head) - len(tail) - len(self.codes[history[cut]])
        titles: list[int] = []
        for item in reversed(history[:cut]):  # the newest titles that fit
            if titles and len(titles) + len(self.titles[item]) + 1 > budget:
                break
            titles = self.titles[item] + (self._words(",") if titles else []) + titles
        return self._codes_example(head + titles[: max(budget, 0)] + tail, history[cut])
