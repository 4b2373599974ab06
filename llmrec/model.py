"""The CLLM4Rec recommender: a frozen causal LM with LoRA, two views of every user and item, an item head.

Every user and item has a *collaborative* and a *content* embedding (two `RecEmbedding` tables over the
same frozen word embeddings). The collaborative view reads interaction documents and is scored over item
tokens only; the content view reads text and is scored over the word vocabulary only; a mutual
regulariser pulls the two views of each ID token together (Zhu et al., "Collaborative Large Language
Model for Recommender Systems", WWW 2024). Finetuning puts a multinomial head on the last prompt
position that scores the whole catalogue in one forward pass. With an item index (``ModelConfig.index``)
the model also learns to write an item's semantic ID after the prompt (task ``semantic``), decoded by
constrained beam search in `llmrec.decoding`.

Every loss method returns ``(sum, count)`` rather than a mean, so that the training loop can divide by the
count summed over all processes: the gradient of a batch split over N processes then equals the
gradient of the whole batch on one, exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from common.artifacts import Kind, recover, write_directory
from common.io import read_json, write_json
from llmrec.backbone import load_backbone
from llmrec.head import ItemHead
from llmrec.id_tables import UserTableSpec
from llmrec.losses import ItemSoftmax
from llmrec.options import BackboneConfig, ModelConfig
from llmrec.prompts import IGNORE, TASKS
from llmrec.tokens import VOCAB_FILE, RecEmbedding, RecVocab

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmrec.indexing.base import ItemIndex

VIEWS = ("collab", "content")
INDEX_DIR = "index"  # the item index saved beside the weights, so a trained model decodes on its own
MODEL_DIR = Kind("model directory", VOCAB_FILE)  # model/ and best/ of a run


class CLLM4Rec(nn.Module):
    """Backbone + LoRA + collaborative/content ID embeddings + item head (`llmrec.head.ItemHead`).

    Only LoRA weights, the ID-token tables and (untied) head are trainable; the backbone is frozen.
    """

    def __init__(
        self,
        lm: nn.Module,
        tokenizer,
        vocab: RecVocab,
        config: ModelConfig,
        backbone: BackboneConfig,
        item_titles: list[str] | None = None,
        seed: int = 0,
        item_index: ItemIndex | None = None,
    ):
        super().__init__()
        self.config, self.backbone = config, backbone
        self.vocab = vocab
        self.item_index = item_index  # the items' semantic IDs (None without the semantic task)
        self.tokenizer = tokenizer
        if not isinstance(lm, PeftModel):
            lora = config.lora_config()
            # LoRA's random init depends on ``seed`` only, not on whatever ran before in this process
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                lm = get_peft_model(lm, lora, adapter_name=VIEWS[0])
                if config.lora_per_view:
                    lm.add_adapter(VIEWS[1], lora)
        causal_lm = lm.get_base_model()
        base = causal_lm.get_input_embeddings()
        init = dict(
            init=config.embedding_init,
            code_init=config.code_init,
            std=config.embedding_init_std,
            titles=item_titles,
            tokenizer=tokenizer,
            item_index=item_index,
            users=UserTableSpec(
                config.user_table,
                config.user_buckets,
                config.user_hashes,
                config.user_rank,
                config.sparse_updates,
            ),
        )
        collab = RecEmbedding(base, vocab, seed=seed, **init)
        content = RecEmbedding(base, vocab, seed=seed + 1, **init)
        # the head is registered first: its parameters then lead ``parameters()`` as they did when they were
        # this module's own, so optimizer groups, their saved state and gradient clipping keep their order
        self.head = ItemHead(config, collab.family_weight("item"))
        self.lm = lm
        self.decoder = causal_lm.base_model  # the transformer without the LM head
        self.lm_head = causal_lm.get_output_embeddings()
        self.collab, self.content = collab, content
        self.item_softmax = ItemSoftmax()  # recipes swap in chunked or sampled softmax for huge catalogues
        # finetuning's --item_loss_weight: the item head's softmax beside semantic_sequence's codes
        self.item_loss_weight = 0.0
        self.preference: nn.Module | None = (
            None  # the alignment loss (`llmrec.align.DPOLoss`), set by recipes/align.py
        )

    def reconfigure(self, **changes) -> None:
        """Change knobs that leave the saved weights valid: ``mutual_reg``, ``max_doc_tokens``, tied -> untied
        head, adding the history paths (``history_pool``, ``prior``) and the prior's blend weight
        (``prior_weight``, when given); see `llmrec.head.ItemHead.reconfigure`.

        Finetuning from a pretraining run keeps that run's backbone, LoRA and tables but takes these from
        its own configuration.
        """
        config = dataclasses.replace(self.config, **changes)
        self.head.reconfigure(config, self.item_table())
        if "prior_weight" in changes and self.head.has_prior:
            self.head.set_prior_weight(config.prior_weight)
        self.config = config

    # ------------------------------------------------------------------ building blocks
    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        backbone: BackboneConfig,
        n_users: int,
        n_items: int,
        item_titles: list[str] | None = None,
        seed: int = 0,
        item_index: ItemIndex | None = None,
    ) -> CLLM4Rec:
        """Load the backbone, freeze it, add LoRA and fresh ID-token tables for ``n_users`` x ``n_items``.

        ``item_index`` (default: loaded from ``config.index`` when set) adds one semantic token per code.
        """
        if item_index is None and config.index:
            from llmrec.indexing.base import ItemIndex  # indexers load only for semantic-ID runs

            item_index = ItemIndex.load(config.index)
        if item_index is not None and item_index.n_items != n_items:
            raise ValueError(
                f"{config.index or 'item_index'}: the index has {item_index.n_items} items, the data {n_items}"
            )
        lm, tokenizer = frozen_backbone(backbone)
        vocab = RecVocab(
            base_size=lm.get_input_embeddings().weight.shape[0],
            n_users=n_users,
            n_items=n_items,
            semantic_codebooks=item_index.codebook_sizes if item_index is not None else (),
        )
        return cls(
            lm, tokenizer, vocab, config, backbone, item_titles=item_titles, seed=seed, item_index=item_index
        )

    def embedding(self, view: str) -> RecEmbedding:
        return self.collab if view == "collab" else self.content

    @contextlib.contextmanager
    def _adapter(self, view: str) -> Iterator[None]:
        if self.config.lora_per_view:
            self.lm.set_adapter(view)
        yield

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, view: str) -> torch.Tensor:
        """Last-layer hidden states (batch, time, hidden) with ID tokens embedded by ``view`` (and, while
        training, dropped out at ``embedding_dropout``)."""
        embeds = self.embedding(view)(input_ids)
        if self.training and self.config.embedding_dropout > 0:
            ids = (input_ids >= self.vocab.base_size).unsqueeze(-1)
            embeds = torch.where(ids, F.dropout(embeds, self.config.embedding_dropout, training=True), embeds)
        with self._adapter(view):
            out = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def hidden_states_cached(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache=None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, object]:
        """Collaborative-view hidden states that also return the decoder's KV cache, for step-by-step decoding.

        ``attention_mask`` covers the cached and the new positions (2D, or a prepared 4D additive mask);
        ``position_ids`` place the new tokens (right-padded prompts continue at each row's own length).
        """
        embeds = self.collab(input_ids)
        with self._adapter("collab"):
            out = self.decoder(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
        return out.last_hidden_state, out.cache

    def item_table(self) -> torch.Tensor:
        """The collaborative item embeddings (n_items, hidden): the tied head's rows, the pool's embeddings."""
        return self.collab.family_weight("item")

    def item_weight(self) -> torch.Tensor:
        """The item head's rows (n_items, hidden): its own when untied, else :meth:`item_table`."""
        return self.head.product(self.item_table())[0]

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every catalogue item from head inputs (..., hidden) -> (..., n_items), before any prior."""
        return self.head.logits(hidden, self.item_table())

    # ------------------------------------------------------------------ losses
    def mutual_regularization(self, input_ids: torch.Tensor, view: str) -> tuple[torch.Tensor, torch.Tensor]:
        """lambda * ||e_view - sg(e_other)||^2 summed over the ID-token positions of the batch."""
        mask = input_ids >= self.vocab.base_size  # every ID-token family lies above the word vocabulary
        count = mask.sum()
        if self.config.mutual_reg == 0 or count == 0:
            return input_ids.new_zeros((), dtype=torch.float32), count
        ids = input_ids[mask]
        other = "content" if view == "collab" else "collab"
        mine = self.embedding(view)(ids).float()
        with torch.no_grad():
            theirs = self.embedding(other)(ids).float()
        return self.config.mutual_reg * (mine - theirs).pow(2).sum(), count

    def collaborative_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-item NLL over item tokens only, at the positions whose next token is a main-text item."""
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"], "collab")
        mask = batch["labels"] != IGNORE
        logits = self.item_logits_for_lm(hidden[mask])
        return F.cross_entropy(logits.float(), batch["labels"][mask], reduction="sum"), mask.sum()

    def item_logits_for_lm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The collaborative LM is always scored by the tied item embeddings (CLLM4Rec), whatever the head."""
        weight = self.collab.family_weight("item")
        return hidden.to(weight.dtype) @ weight.T

    def semantic_logits(self, hidden: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """Scores of semantic codes from hidden states, tied to the collaborative semantic table.

        With ``level``: (..., codebook size of that level); without: (..., every semantic row, level-major).
        """
        weight = self.collab.family_weight("semantic")
        if level is not None:
            start = self.vocab.level_range(level).start - self.vocab.family_range("semantic").start
            weight = weight[start : start + self.vocab.semantic_codebooks[level]]
        return hidden.to(weight.dtype) @ weight.T

    def semantic_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL of each semantic-ID token given what precedes it, normalised over its own level's codes only.

        Labels are rows of the semantic table (token id - first semantic id); a code at level l competes
        with the other codes of level l, never with other levels or words, which is exactly what beam
        search compares at step l (`llmrec.decoding`). With ``item_loss_weight`` and a batch's
        ``item_labels`` (`llmrec.generate.SemanticSequenceDataset`), that weight times the item head's
        next-item NLL is added, normalised by the same count of codes.
        """
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"], "collab")
        mask = batch["labels"] != IGNORE
        rows = batch["labels"][mask]
        logits = self.semantic_logits(hidden[mask]).float()
        bounds = torch.tensor([0, *self.vocab.semantic_codebooks], device=rows.device).cumsum(0)
        level = torch.searchsorted(bounds, rows, right=True) - 1
        columns = torch.arange(logits.shape[-1], device=rows.device)
        other_level = (columns < bounds[level, None]) | (columns >= bounds[level + 1, None])
        logits = logits.masked_fill(other_level, float("-inf"))
        nll = F.cross_entropy(logits, rows, reduction="sum")
        if self.item_loss_weight and "item_labels" in batch:
            # the item head's next-item softmax where the next item's first code is written: the
            # collaborative signal of the sequential task, on the hidden states the codes are read from
            at = batch["item_labels"] != IGNORE
            items = batch["item_labels"][at][:, None]
            nll = nll + self.item_loss_weight * self.item_softmax(
                hidden[at], *self.head.product(self.item_table()), items
            )
        return nll, mask.sum()

    def content_loss(
        self, batch: dict[str, torch.Tensor], view: str = "content"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-word NLL over the word vocabulary, on main-text positions only, with ``view``'s ID tokens
        (the content corpus; ``collab`` for a title written after an item's semantic ID)."""
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"], view)
        mask = batch["labels"] != IGNORE
        logits = self.lm_head(hidden[mask])
        return F.cross_entropy(logits.float(), batch["labels"][mask], reduction="sum"), mask.sum()

    def last_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, history: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The item head's input: the hidden state at each row's last real token (right padding), plus,
        with the history pool (``history_pool="mean"``), the pooled collaborative embeddings of the user's
        history items (`llmrec.head.ItemHead.pool`).

        The pooled path hands the head the whole bag of history items directly (as Mult-VAE's encoder
        sees it) instead of only through what the last position attends to. ``history`` (batch, length)
        holds the items, padded with -1; without it the prompt's own item tokens are the history (a
        prompt cut to ``max_doc_tokens`` then loses the oldest ones).
        """
        state = last_position(self.hidden_states(input_ids, attention_mask, "collab"), attention_mask)
        if not self.head.pooled:
            return state
        return self.head_input(state, self.history_bag(input_ids, attention_mask, history))

    def head_input(self, state: torch.Tensor, bag: torch.Tensor | None) -> torch.Tensor:
        """The prompt's last hidden ``state`` (batch, hidden) with the pooled ``bag`` of history items
        (:meth:`history_bag`; None when the head has no pool); `llmrec.scoring.UserStates` caches it."""
        return self.head.pool(state, bag, self.item_table())

    def prefix_head_inputs(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, older: torch.Tensor
    ) -> torch.Tensor:
        """The head input at every position of a chronological prompt (batch, time, hidden): with
        ``history_pool="mean"``, each position's hidden state plus the pooled bag of the items up to it.

        Position t's bag is the items the prompt left out (``older``, padded with -1) and the prompt's items
        up to t, each item once, so it is :meth:`history_bag` of the one-prefix prompt that ends at t with
        its whole history: a causal (prefix) mean that never lets a position see a later item.
        """
        if not self.head.pooled:
            return hidden
        table = self.item_table()
        n_items = self.vocab.n_items
        slot = self.item_slots(input_ids, attention_mask)
        inside = slot < n_items
        # count an item at its first occurrence only, and not at all when `older` holds it
        positions = torch.arange(slot.shape[1], device=slot.device).expand_as(slot)
        first = torch.full((slot.shape[0], n_items + 1), slot.shape[1], device=slot.device)
        first = first.scatter_reduce(1, slot, positions, reduce="amin")
        old_bag = self.history_bag(None, None, older)
        counted = inside & (first.gather(1, slot) == positions)
        counted &= old_bag.gather(1, slot.clamp(max=n_items - 1)) == 0
        steps = table[slot.clamp(max=n_items - 1)] * counted.unsqueeze(-1).to(table.dtype)
        pooled = steps.cumsum(dim=1) + (old_bag.to(table.dtype) @ table).unsqueeze(1)
        return self.head.add_pooled(hidden, pooled)

    def head_scores(self, state: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """(batch, n_items) scores from head inputs (:meth:`last_hidden`) and, with a prior, the prior's
        scores of the histories: the part of :meth:`score_items` after the LM, so a cached head input
        scores alone (`llmrec.head.ItemHead.scores`)."""
        return self.head.scores(state, self.item_table(), prior)

    def history_bag(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        history: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, n_items) 0/1 rows of the users' history items: ``history`` (padded with -1) when given
        (the prompt is then not read), else the prompt's item tokens."""
        if history is None:
            slot = self.item_slots(input_ids, attention_mask)
        else:
            slot = torch.where(history >= 0, history, self.vocab.n_items)
        bag = torch.zeros(slot.shape[0], self.vocab.n_items + 1, device=slot.device)
        bag.scatter_(1, slot, 1.0)
        return bag[:, :-1]

    def item_slots(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The catalogue index of every item token of a prompt, ``n_items`` at words and padding."""
        index = input_ids - self.vocab.family_range("item").start
        inside = (index >= 0) & (index < self.vocab.n_items) & attention_mask.bool()
        return torch.where(inside, index, self.vocab.n_items)

    def score_items(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, history: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One forward pass per prompt scores the whole catalogue: (batch, n_items) scores.

        With a prior, scores are z(LM logits) + w * z(prior scores of the history), each standardised per
        user so that one weight means the same for every user and catalogue (w: the head's blend weight).
        """
        state = self.last_hidden(input_ids, attention_mask, history)
        if not self.head.has_prior:
            return self.head_scores(state, None)
        return self.head_scores(
            state, self.head.prior_scores(self.history_bag(input_ids, attention_mask, history))
        )

    def score_parts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, history: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM logits, prior scores) before blending, so the prior's weight can be chosen on validation."""
        if not self.head.has_prior:
            raise ValueError("score_parts: this model's item head has no prior (prior: none)")
        logits = self.item_logits(self.last_hidden(input_ids, attention_mask, history)).float()
        return logits, self.head.prior_scores(self.history_bag(input_ids, attention_mask, history))

    def finetune_loss(
        self, batch: dict[str, torch.Tensor], softmax: ItemSoftmax
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Multinomial NLL -sum_j y_j log softmax(logits)_j of each user's target items, summed over users."""
        hidden = self.last_hidden(batch["input_ids"], batch["attention_mask"], batch.get("history"))
        nll = softmax(hidden, *self.head.product(self.item_table()), batch["targets"])
        return nll, torch.tensor(hidden.shape[0], device=hidden.device)

    def sequential_loss(
        self, batch: dict[str, torch.Tensor], softmax: ItemSoftmax
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-item NLL through the item head at every labelled position of one causal forward.

        Position t's hidden state has seen only the prompt and items up to t, so its loss is the loss
        of the one-prefix prompt that ends there (`collate.SequenceDataset`); the item head and softmax
        are those of the multinomial task.
        """
        ids, attention = batch["input_ids"], batch["attention_mask"]
        older = batch.get("older", ids.new_full((ids.shape[0], 0), -1))
        hidden = self.prefix_head_inputs(self.hidden_states(ids, attention, "collab"), ids, attention, older)
        mask = batch["labels"] != IGNORE
        nll = softmax(hidden[mask], *self.head.product(self.item_table()), batch["labels"][mask][:, None])
        return nll, mask.sum()

    def item_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, n_items) log-softmax of the item head's logits at each prompt's last position: the
        distribution next-item training fits (a prior is blended only into rankings, never in here)."""
        logits = self.item_logits(self.last_hidden(input_ids, attention_mask)).float()
        return torch.log_softmax(logits, dim=-1)

    def preference_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The alignment loss (``model.preference``: `llmrec.align.DPOLoss`, `llmrec.grpo.GRPOLoss`) of the
        item head's catalogue log-softmax (:meth:`item_log_probs`); a ``semantic_preference`` batch (the
        semantic-ID generator's, `llmrec.generator_align`) hands the loss the model itself, since its
        rollouts and their code log-probabilities take forwards of their own."""
        if self.preference is None:
            raise ValueError("a preference batch needs model.preference (e.g. llmrec.align.DPOLoss) set")
        if TASKS[int(batch["task"][0])] == "semantic_preference":
            return self.preference(self, batch)
        return self.preference(self.item_log_probs(batch["input_ids"], batch["attention_mask"]), batch)

    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Losses of a one-task batch as (lm_sum, lm_count, reg_sum, reg_count).

        The forward of a DDP-wrapped module must be the entry point, so the task dispatch lives here.
        """
        task = TASKS[int(batch["task"][0])]
        ids = batch["input_ids"]
        if task == "collaborative":
            lm, view = self.collaborative_loss(batch), "collab"
        elif task == "content":
            lm, view = self.content_loss(batch), "content"
        elif task in ("semantic", "semantic_sequence", "semantic_title"):
            view = "collab"
            lm = self.content_loss(batch, view) if task == "semantic_title" else self.semantic_loss(batch)
            # semantic tokens have no content view to agree with: regularise the prompt's user/item tokens only
            ids = ids.masked_fill(ids >= self.vocab.family_range("semantic").start, 0)
        elif task == "sequential":
            lm, view = self.sequential_loss(batch, self.item_softmax), "collab"
        elif task in ("preference", "semantic_preference"):
            lm, view = self.preference_loss(batch), "collab"
            if task == "semantic_preference":  # as the semantic tasks: codes have no content view
                ids = ids.masked_fill(ids >= self.vocab.family_range("semantic").start, 0)
        else:
            lm, view = self.finetune_loss(batch, self.item_softmax), "collab"
        return (*lm, *self.mutual_regularization(ids, view))

    def param_groups(self, lr: float, embedding_lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups: the LoRA weights (inside the peft model) at ``lr`` with weight decay, the
        ID-token tables and head at ``embedding_lr`` without."""
        lora = {id(p) for p in self.lm.parameters() if p.requires_grad}
        trainable = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in trainable if id(p) in lora], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for p in trainable if id(p) not in lora], "lr": embedding_lr, "weight_decay": 0.0},
        ]

    # ------------------------------------------------------------------ persistence
    def trainable_state_dict(
        self, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Only what training produces: LoRA weights, ID-token tables, head, and the head's buffers (a fitted
        prior and its blend weight).

        The frozen backbone is rebuilt from its spec. ``state_dict``: a full state dict to pick from (e.g.
        one gathered from FSDP shards) instead of this module's.
        """
        names = {name for name, param in self.named_parameters() if param.requires_grad}
        names |= {f"head.{name}" for name, _ in self.head.named_buffers()}
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {name: tensor for name, tensor in state_dict.items() if name in names}

    def save_pretrained(
        self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write ``config.json``, ``rec_vocab.json``, ``model.safetensors`` (trainable weights only) and ``index/``.

        ``state_dict``: the full weights to save from, when this module's own are sharded (FSDP, ZeRO-3).
        Written beside ``directory`` and renamed in; an existing directory is replaced only when it is
        a model directory (has ``rec_vocab.json``), see `common.artifacts`.
        """
        config = {"model": asdict(self.config), "backbone": asdict(self.backbone)}
        state = {
            name: tensor.detach().contiguous().cpu()
            for name, tensor in self.trainable_state_dict(state_dict).items()
        }
        with write_directory(directory, MODEL_DIR, overwrite=True) as tmp:
            write_json(tmp / "config.json", config)
            self.vocab.save_pretrained(tmp)
            save_file(state, str(tmp / "model.safetensors"))
            if self.item_index is not None:
                self.item_index.save(tmp / INDEX_DIR)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **backbone_overrides) -> CLLM4Rec:
        """Rebuild the backbone from the saved spec and load the trained weights (safetensors, no pickle).

        ``backbone_overrides`` change how the backbone is loaded (e.g. ``load_in_4bit``, ``cache_dir``).
        """
        directory = Path(directory)
        recover(directory)  # a save killed while renaming leaves the old or new model beside it
        saved = read_json(directory / "config.json", "model config")
        config = ModelConfig(**saved["model"])
        backbone = BackboneConfig(**{**saved["backbone"], **backbone_overrides})
        index = None
        if (directory / INDEX_DIR).is_dir():
            from llmrec.indexing.base import ItemIndex  # indexers load only for semantic-ID runs

            index = ItemIndex.load(directory / INDEX_DIR)
        lm, tokenizer = frozen_backbone(backbone)
        vocab = RecVocab.from_pretrained(directory)
        return cls.restore(lm, tokenizer, vocab, config, backbone, directory / "model.safetensors", index)

    @classmethod
    def restore(
        cls,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vocab: RecVocab,
        config: ModelConfig,
        backbone: BackboneConfig,
        weights: Path,
        item_index: ItemIndex | None = None,
    ) -> CLLM4Rec:
        """A trained model from its frozen backbone, saved vocabulary and config, and trainable ``weights``:
        the one rebuild behind a run's model directory (`from_pretrained`) and an export bundle
        (`llmrec.bundle`). ``lm`` either gets fresh LoRA that ``weights`` fill (a run's) or already
        carries its trained adapters (a bundle's). Built with a normal init, since the saved tables replace
        any (a ``title_mean`` one would need titles); ``model.config`` is then the one it was trained with.
        """
        rows = lm.get_input_embeddings().weight.shape[0]
        if rows != vocab.base_size:
            raise ValueError(
                f"{weights}: backbone {backbone.name_or_path!r} has {rows} embedding rows, the saved "
                f"vocabulary was built on {vocab.base_size}"
            )
        build = dataclasses.replace(config, embedding_init="normal", code_init="normal")
        model = cls(lm, tokenizer, vocab, build, backbone, item_index=item_index)
        model.config = config
        model.load_trainable(weights)
        return model

    def load_trainable(self, path: str | Path) -> None:
        """Load trained weights saved by `save_pretrained`, refusing any that do not fit this model. Files
        written before the item head was a module load too (`llmrec.head.ItemHead.upgrade_state_dict`)."""
        try:
            state = load_file(str(path))
        except (OSError, safetensors.SafetensorError) as err:
            raise ValueError(f"{path}: cannot read trained weights ({err})") from err
        state = self.head.upgrade_state_dict(state, "head.")
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not match this model (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
        current = self.trainable_state_dict()
        for name, tensor in state.items():
            if tensor.shape != current[name].shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, this model expects {tuple(current[name].shape)}"
                )
        self.load_state_dict(state, strict=False)


def frozen_backbone(backbone: BackboneConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The backbone with every weight frozen (only LoRA and the ID tables train); a 4/8-bit one is
    prepared for training adapters on it."""
    lm, tokenizer = load_backbone(backbone)
    if backbone.load_in_4bit or backbone.load_in_8bit:
        from peft import prepare_model_for_kbit_training

        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    return lm.requires_grad_(False), tokenizer


def last_position(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, hidden) states at each right-padded row's last real token."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), attention_mask.sum(dim=1) - 1]
