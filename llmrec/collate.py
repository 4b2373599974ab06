"""Soft+hard prompt documents -> tensors.

ID tokens become ids directly through `RecVocab.encode` (never through the tokenizer's added-token
trie). All per-epoch randomness (CLLM4Rec's stochastic item reordering, the finetuning history mask,
batch order) is drawn from generators seeded by ``(seed, epoch, row)``, never from global RNG state:
a run resumed mid-epoch, or split over several processes, sees exactly the same examples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from llmrec.config import ConfigError
from llmrec.prompts import IGNORE, TASKS, FinetunePrompts, pad, prompt_batch
from llmrec.tokens import RecVocab

PREFERENCE_KEYS = (
    "chosen",
    "rejected",
    "ref_chosen",
    "ref_rejected",
    "ref_log_probs",
    "rollout_key",
)  # rows of `llmrec.align.PreferenceDataset` (DPO, S-DPO and GRPO rows), `llmrec.generator_align.GeneratorRows`


def epoch_rng(seed: int, epoch: int, row: int | None = None) -> np.random.Generator:
    """The generator of one row (or, with ``row=None``, of the batch order) in one epoch."""
    return np.random.default_rng((seed, epoch, 0) if row is None else (seed, epoch, 1, row))


def lm_example(
    prompt_ids: Sequence[int], main_inputs: Sequence[int], main_labels: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Concatenate prompt and main text; position t is labelled with main token t+1 (loss on main text only)."""
    input_ids = list(prompt_ids) + list(main_inputs)
    labels = [IGNORE] * (len(prompt_ids) - 1) + list(main_labels) + [IGNORE]
    return input_ids, labels


class PretrainDataset(Dataset):
    """Collaborative and content documents of a bundle's corpora, encoded once.

    Collaborative main text is the user's items; its order is re-shuffled every epoch. Documents
    longer than ``max_tokens`` are cut: collaborative ones after shuffling (so a different subset of a
    long history is seen each epoch), content ones at the end.
    """

    def __init__(
        self, rows: Sequence[dict], vocab: RecVocab, tokenizer, seed: int = 0, max_tokens: int = 512
    ):
        self.vocab, self.seed, self.max_tokens, self.epoch = vocab, seed, max_tokens, 0
        item_offset = vocab.family_range("item").start
        self.examples: list[tuple[int, list[int], list[int]]] = []
        for row in rows:
            prompt = vocab.encode(row["prompt"], tokenizer)
            if row["kind"] == "collaborative":
                main = [token - item_offset for token in vocab.encode(row["main"], tokenizer)]
                self.examples.append((TASKS.index("collaborative"), prompt, main))
            else:
                main = tokenizer(" " + row["main"].strip(), add_special_tokens=False)["input_ids"]
                self.examples.append(
                    (TASKS.index("content"), prompt, main[: max(0, max_tokens - len(prompt))])
                )
        content = [main for task, _, main in self.examples if task == TASKS.index("content")]
        if content and not any(content):
            shortest = min(len(p) for task, p, _ in self.examples if task == TASKS.index("content"))
            raise ConfigError(
                f"field 'max_doc_tokens' {max_tokens} leaves no room for content text after prompts of "
                f"{shortest}+ tokens (every content loss would be 0); raise it",
                field="max_doc_tokens",
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def task(self, index: int) -> int:
        return self.examples[index][0]

    def length(self, index: int) -> int:
        _, prompt, main = self.examples[index]
        return min(len(prompt) + len(main), self.max_tokens)

    def __getitem__(self, index: int) -> dict:
        task, prompt, main = self.examples[index]
        if task == TASKS.index("collaborative"):
            items = epoch_rng(self.seed, self.epoch, index).permutation(np.asarray(main, dtype=np.int64))
            items = items[: max(1, self.max_tokens - len(prompt))].tolist()
            input_ids, labels = lm_example(prompt, [self.vocab.item_token(i) for i in items], items)
        else:
            input_ids, labels = lm_example(prompt, main, main)
        return {"task": task, "input_ids": input_ids, "labels": labels}


class FinetuneDataset(Dataset):
    """CLLM4Rec's recommendation-oriented finetuning examples, one per user with training items.

    Each epoch a fresh random ``1 - mask_ratio`` share of the user's training items goes into the
    prompt (at least one item in, at least one out, when the user has two or more); the target is all
    training items (``target="all"``, Mult-VAE style denoising, as DESIGN.md) or only the masked ones
    (``"masked"``: nothing is gained by copying the prompt, which is what evaluation asks for, since seen
    items are excluded there). The prompt lists its items in a random order (``prompt_order="shuffled"``)
    or oldest first (``"chronological"``, the order of evaluation prompts).
    """

    def __init__(
        self,
        histories: Sequence[Sequence[int]],
        prompts: FinetunePrompts,
        seed: int = 0,
        mask_ratio: float = 0.2,
        target: str = "all",
        prompt_order: str = "shuffled",
    ):
        if target not in ("all", "masked"):
            raise ValueError(f"unknown finetune target {target!r}: expected 'all' or 'masked'")
        if prompt_order not in ("shuffled", "chronological"):
            raise ValueError(f"unknown prompt order {prompt_order!r}: expected 'shuffled' or 'chronological'")
        self.prompt_order = prompt_order
        self.users = [user for user, items in enumerate(histories) if len(items) > 0]
        self.histories = [np.asarray(histories[user], dtype=np.int64) for user in self.users]
        self.prompts, self.seed, self.mask_ratio, self.target, self.epoch = (
            prompts,
            seed,
            mask_ratio,
            target,
            0,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.users)

    def task(self, index: int) -> int:
        return TASKS.index("finetune")

    def length(self, index: int) -> int:
        return min(len(self.histories[index]), self.prompts.max_tokens)

    def split(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt items, held-out items) of row ``index`` for the current epoch."""
        history = self.histories[index]
        order = epoch_rng(self.seed, self.epoch, index).permutation(len(history))
        n = len(history)
        keep = n if n < 2 else int(np.clip(round(n * (1 - self.mask_ratio)), 1, n - 1))
        kept = np.sort(order[:keep]) if self.prompt_order == "chronological" else order[:keep]
        return history[kept], history[order[keep:]]

    def __getitem__(self, index: int) -> dict:
        kept, masked = self.split(index)
        targets = self.histories[index] if self.target == "all" or len(masked) == 0 else masked
        user = self.users[index]
        return {
            "task": TASKS.index("finetune"),
            "input_ids": self.prompts.encode(user, kept),
            "targets": targets.tolist(),
            "user": user,
            "history": kept.tolist(),  # every prompt item, also those a long prompt had to leave out
        }


class SequenceDataset(Dataset):
    """Next-item examples for the item head: one per user, the chronological history in one forward.

    The prompt is rendered by ``prompts`` (a template such as ``"<user_{user}> has interacted with
    {history}"``) over the user's whole training history, oldest first (the oldest items are cut to fit
    ``max_tokens``, as SASRec keeps the last ``max_len``). Every position whose next token is an item
    token is labelled with that item: one forward trains every prefix at once, as causal LM training
    does, and the last position of a prefix is exactly where the same prompt is scored at test time.
    With ``windows`` a history longer than a prompt holds is cut into consecutive windows, newest first,
    one example each (the items before a window are its ``older`` items), so every training interaction
    is a target once per epoch, not only the newest ones. Deterministic: nothing is drawn per epoch.
    """

    def __init__(self, histories: Sequence[Sequence[int]], prompts: FinetunePrompts, windows: bool = False):
        self.users: list[int] = []
        self.histories: list[list[int]] = []  # each example's history, up to its last item
        for user, items in enumerate(histories):
            end = len(items)
            while end > 0:
                self.users.append(user)
                self.histories.append(list(items[:end]))
                if not windows:
                    break
                end -= len(prompts.kept(user, items[:end]))
        self.prompts = prompts
        self.items = prompts.vocab.family_range("item")

    def __len__(self) -> int:
        return len(self.users)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to redraw: the same windows every epoch (the sampler shuffles their order)."""

    def task(self, index: int) -> int:
        return TASKS.index("sequential")

    def length(self, index: int) -> int:
        return min(len(self.histories[index]), self.prompts.max_tokens)

    def __getitem__(self, index: int) -> dict:
        user, history = self.users[index], self.histories[index]
        kept = self.prompts.kept(user, history)
        input_ids = self.prompts.encode(user, history)
        labels = [t - self.items.start if t in self.items else IGNORE for t in input_ids[1:]] + [IGNORE]
        # the items a long prompt leaves out: the pooled history path (`history_pool`) still counts them
        older = history[: len(history) - len(kept)]
        return {"task": TASKS.index("sequential"), "input_ids": input_ids, "labels": labels, "older": older}


class TaskBucketSampler(Sampler[list[int]]):
    """Batches of one task each, of similar lengths, in a seeded order that changes every epoch.

    Rows are shuffled, cut into pools of ``batch_size * pool_batches``, sorted by length inside a pool
    and sliced into batches (length bucketing: short documents are not padded to long ones), then all
    batches are shuffled. ``batch_size`` is the global batch: accelerate splits each batch over processes.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, shuffle: bool = True, pool_batches: int = 50):
        self.dataset, self.batch_size, self.seed, self.shuffle, self.pool_batches = (
            dataset,
            batch_size,
            seed,
            shuffle,
            pool_batches,
        )
        self.drop_last = False
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _batches(self) -> list[list[int]]:
        rng = epoch_rng(self.seed, self.epoch)
        by_task: dict[int, list[int]] = {}
        for index in range(len(self.dataset)):
            by_task.setdefault(self.dataset.task(index), []).append(index)
        batches = []
        pool = self.batch_size * self.pool_batches
        for task in sorted(by_task):
            rows = np.asarray(by_task[task])
            if self.shuffle:
                rows = rng.permutation(rows)
            for start in range(0, len(rows), pool):
                chunk = sorted(rows[start : start + pool].tolist(), key=self.dataset.length)
                batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        """The batch count, derived from the task sizes alone (the same every epoch; no shuffling or sorting)."""
        pool = self.batch_size * self.pool_batches
        sizes = np.bincount([self.dataset.task(index) for index in range(len(self.dataset))])
        return sum(
            (n // pool) * -(-pool // self.batch_size) + -(-(n % pool) // self.batch_size)
            for n in sizes.tolist()
        )


def collate(examples: Sequence[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch of one task; every entry is a tensor so accelerate can split it across processes."""
    batch = {
        "task": torch.tensor([example["task"] for example in examples]),
        **prompt_batch([example["input_ids"] for example in examples], pad_token_id),
    }
    for key in ("labels", "item_labels"):
        if key in examples[0]:
            batch[key] = pad([example[key] for example in examples], IGNORE)
    if "targets" in examples[0]:
        batch["targets"] = pad([example["targets"] for example in examples], -1)
        batch["user"] = torch.tensor([example["user"] for example in examples])
    for key in ("history", "older", "excluded"):
        if key in examples[0]:
            batch[key] = pad([example[key] for example in examples], -1)
    for key in PREFERENCE_KEYS:
        if key in examples[0]:
            batch[key] = torch.tensor([example[key] for example in examples])
    return batch


class TaskMixture(Dataset):
    """Several task datasets seen as one, so that one sampler draws one-task batches from all of them."""

    def __init__(self, *parts: Dataset):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts])

    def _locate(self, index: int) -> tuple[Dataset, int]:
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part], index - int(self.starts[part])

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def task(self, index: int) -> int:
        part, local = self._locate(index)
        return part.task(local)

    def length(self, index: int) -> int:
        part, local = self._locate(index)
        return part.length(local)

    def __getitem__(self, index: int) -> dict:
        part, local = self._locate(index)
        return part[local]
