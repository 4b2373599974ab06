"""Alignment of the semantic-ID generator after supervised finetuning: GRPO over trie-constrained rollouts,
and DPO / S-DPO over the sequence log-probabilities of items' code tuples.

The item head's alignment (`llmrec.align`, `llmrec.grpo`) scores the whole catalogue in one softmax. A
generator run (``task`` in `llmrec.pipeline.GENERATIVE_TASKS`) has no such head: it writes an item's semantic
ID code by code, each code scored by its own level's softmax (`CLLM4Rec.semantic_logits`), and
evaluation ranks items by constrained beam search over the index's trie (`llmrec.decoding`). Here the
policy is that generator, and the prompt is the one its run trained and is evaluated on (for
``semantic_sequence``: the history written in semantic IDs), over a chronological prefix of a user's
training history; the target is the item that came next (the same cuts as the item head's rows,
`llmrec.align.preference_cuts`).

**GRPO** (:class:`GeneratorGRPOLoss`). For every prompt, ``group`` rollouts are drawn from the current
policy at every step; each rollout is a list of ``length`` items (``length`` 1: one item), each item drawn
code by code from the per-level softmax restricted to the trie's continuations that still lead to an
allowed item (the user's other training items and the list's earlier items are excluded), so every
rollout is a list of real, unseen, distinct items. Its reward is `llmrec.grpo.rollout_rewards` (the
target's hit at its rank, ``1 / log2(rank + 1)``; for one item, the hit), its advantage
`llmrec.grpo.group_advantages`, and the loss of a prompt is

    L = -mean_g A_g * log pi(rollout_g) / codes(rollout_g) + kl_weight * mean_items KL(pi || ref)

where ``log pi(rollout)`` is the exact log-probability of the draw: the sum over its items and their codes
of each code's log-probability under the *restricted* per-level softmax (the distribution that drew it).
The policy gradient ``sum_g A_g grad log pi`` is unbiased only for the distribution the rollouts came
from; the unrestricted sum (the beam's score) differs from it by ``log`` of the mass of the allowed codes
at every prefix, which varies between rollouts below the first level (43-45% of the SFT generator's free
beams name a seen item). Rollouts are drawn and used for one step, so the PPO ratio is 1 and its clip is
inactive. The KL to the frozen SFT model is exact per level: at each drawn item's prefixes, the KL between
the policy's and the reference's restricted per-level distributions over the allowed codes, summed over
levels (an unbiased, Rao-Blackwellised estimate of the items' sequence KL; with codebooks of 64-256 codes
the full distributions are in hand anyway, and it has none of the variance of the sampled k3 estimator).
The reference runs the same rollouts in one more forward (no gradient) each step: its per-level
distributions depend on the drawn prefixes, so they cannot be computed once per prompt as the item head's.

**DPO / S-DPO** (:class:`GeneratorDPOLoss`): the chosen item is the next item; the rejected ones are the
SFT model's constrained-beam top ``n_rejected`` items the user never took in training plus ``n_random``
uniform ones from the rest of the unseen catalogue; an item's log-probability is the sum of its codes'
per-level log-probabilities (unrestricted: the score beam search ranks by and SFT maximises, so the margin
DPO widens is the beam's). The reference's are computed once from the SFT model before training (offline
DPO, as `llmrec.align`), and the losses are `llmrec.align.dpo_loss` / `sdpo_loss`.

Forwards. An item's code log-probabilities come from one teacher-forced forward per prompt in which the
prompt is followed by all of its rollouts' code tuples side by side (:func:`tuple_hidden`): a 4D mask lets
each code see the prompt and the earlier codes of its own tuple only, at the positions a forward of
prompt + that tuple uses, so ``group x length`` items cost ``group x length x (levels - 1)`` extra tokens,
not as many copies of the prompt. Draws reuse evaluation's `llmrec.decoding.ModelDecoder` (the prompt's KV
cache shared by its rollouts). Dropout is off throughout (as TRL's trainers default to): the policy that
draws, the one that is differentiated and the reference are the same network at the start, so the ratio is
exactly 1 and the KL exactly 0 there. Each row's draws are seeded by ``(seed, epoch, row)``, so a resumed
run draws the same rollouts.

Why not TRL's ``GRPOTrainer`` / ``DPOTrainer``: they generate and score text completions through
``model.generate`` and ``model(...).logits`` over the LM vocabulary, with rewards that read decoded text.
Here the code tokens are rows of llmrec's `RecEmbedding` tables outside the LM vocabulary, scored per level
(`CLLM4Rec.semantic_logits`); rollouts must follow the item trie with each user's seen items excluded
(per-user exclusion needs the trie's item counts, `TrieTensors.remaining`); and training runs through
llmrec's own loop (accelerate, task batches, checkpoints, beam-search validation, best model). So the
losses are written here and plug into `CLLM4Rec.forward` as the ``semantic_preference`` task, whose
module (``model.preference``) is handed the model itself: its rollouts take their own forwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from llmrec.align import PREFERENCE_LOSSES, preference_cuts
from llmrec.decoding import ModelDecoder, TrieTensors, constrained_beam_search, require_index
from llmrec.grpo import group_advantages, rollout_rewards
from llmrec.model import CLLM4Rec
from llmrec.prompts import TASKS, FinetunePrompts, pad, prompt_batch


class GeneratorRows(Dataset):
    """Fixed rows of the ``semantic_preference`` task: a prompt, the chosen (next) item and, for GRPO, the
    items its rollouts exclude, or, for DPO, the rejected items and the reference's log-probabilities.

    Every row also carries ``rollout_key = (epoch, row)``, which seeds its GRPO draws."""

    def __init__(self, rows: list[dict]):
        self.rows, self.epoch = rows, 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def task(self, index: int) -> int:
        return TASKS.index("semantic_preference")

    def length(self, index: int) -> int:
        return len(self.rows[index]["input_ids"])

    def __getitem__(self, index: int) -> dict:
        return {**self.rows[index], "rollout_key": [self.epoch, index]}


def build_generator_grpo_rows(
    prompts: FinetunePrompts, histories: Sequence[Sequence[int]], per_user: int = 1
) -> GeneratorRows:
    """GRPO rows for the `llmrec.align.preference_cuts` cuts: the prompt of ``history[:t]``, the chosen
    item ``history[t]`` and the items its rollouts may not hold (``excluded``: the user's other training
    items). Nothing is precomputed from the reference: its distributions depend on the drawn codes."""
    rows = []
    for user, t in preference_cuts(histories, per_user):
        chosen = int(histories[user][t])
        rows.append(
            {
                "task": TASKS.index("semantic_preference"),
                "input_ids": prompts.encode(user, histories[user][:t]),
                "chosen": chosen,
                "excluded": sorted({int(i) for i in histories[user]} - {chosen}),
            }
        )
    return GeneratorRows(rows)


# ---------------------------------------------------------------------------------------- forwards
def device_of(model: CLLM4Rec) -> torch.device:
    return model.collab.base.weight.device


@contextlib.contextmanager
def no_dropout(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) for the block, then back to the mode it was in; gradients
    still flow."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def tuple_hidden(
    model: CLLM4Rec, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """(batch, n, depth, hidden): the hidden state that predicts code ``d`` of tuple ``j`` after prompt ``b``.

    ``input_ids``/``attention_mask``: (batch, width) right-padded prompts; ``tokens``: (batch, n, depth)
    semantic token ids of ``n`` code tuples per prompt (-1 past a tuple's end). One forward of each prompt
    followed by its tuples' codes side by side, with a 4D mask letting each code see the prompt's real
    tokens and the earlier codes of its own tuple, at the positions the forward of prompt + that tuple
    gives them (`llmrec.decoding.ModelDecoder`'s layout, without the cache): the result equals ``n``
    separate teacher-forced forwards. Code ``0`` is predicted at the prompt's last real position.
    """
    batch, width = input_ids.shape
    n, depth = tokens.shape[1:]
    steps = depth - 1  # the last code of a tuple is only predicted, never read
    device = input_ids.device
    lengths = attention_mask.sum(dim=1)
    codes = tokens[:, :, :steps].clamp(min=0).reshape(batch, n * steps)
    ids = torch.cat([input_ids, codes], dim=1)
    queries = n * steps
    where = torch.arange(width, device=device)
    prompt = attention_mask.bool()[:, None, :] & (where[None, :] <= where[:, None])[None]
    prompt |= torch.eye(width, dtype=torch.bool, device=device)[None]  # a padding row sees itself
    step = torch.arange(steps, device=device).repeat(n)
    owner = torch.arange(n, device=device).repeat_interleave(steps)
    own = (owner[:, None] == owner[None, :]) & (step[None, :] <= step[:, None])
    allowed = torch.cat(
        [
            torch.cat([prompt, prompt.new_zeros(batch, width, queries)], dim=2),
            torch.cat(
                [attention_mask.bool()[:, None, :].expand(batch, queries, width), own.expand(batch, -1, -1)],
                dim=2,
            ),
        ],
        dim=1,
    )
    dtype = model.collab.base.weight.dtype
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
    additive = additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    # code s of a tuple sits at position len + s, as in the forward of prompt + that tuple
    positions = torch.cat([where.expand(batch, width), lengths[:, None] + step[None, :]], dim=1)
    with model._adapter("collab"):
        out = model.decoder(
            inputs_embeds=model.collab(ids), attention_mask=additive, position_ids=positions, use_cache=False
        )
    hidden = out.last_hidden_state
    last = hidden[torch.arange(batch, device=device), lengths - 1]  # predicts code 0 of every tuple
    first = last[:, None, None, :].expand(batch, n, 1, -1)
    if steps == 0:
        return first
    after = hidden[:, width:].reshape(batch, n, steps, -1)  # code s predicts code s + 1
    return torch.cat([first, after], dim=2)


def level_log_probs(model: CLLM4Rec, hidden: torch.Tensor, trie: TrieTensors) -> list[torch.Tensor]:
    """Per tuple position ``d``: (batch, n, codebook size) log-softmax of that position's level."""
    return [
        torch.log_softmax(model.semantic_logits(hidden[:, :, d], trie.level(d)).float(), dim=-1)
        for d in range(hidden.shape[2])
    ]


def children(trie: TrieTensors, node: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The edges out of ``node`` (any shape), each (..., max_children): codes, child nodes, and which
    exist (a leaf has none)."""
    edge = trie.edge_start[node][..., None] + torch.arange(trie.max_children, device=node.device)
    exists = edge < trie.edge_end[node][..., None]
    edge = torch.where(exists, edge, 0)
    return trie.edge_code[edge], trie.edge_child[edge], exists


def under(trie: TrieTensors, items: torch.Tensor, depth: int) -> torch.Tensor:
    """The node of each item's prefix of ``depth + 1`` codes (-1 for an invalid item or a shorter tuple)."""
    nodes = trie.paths[items.clamp(min=0), depth]
    return torch.where(items >= 0, nodes, -1)


def allowed_codes(
    trie: TrieTensors,
    items: torch.Tensor,
    remaining: torch.Tensor,
    sizes: Sequence[int],
) -> list[torch.Tensor]:
    """Per tuple position ``d``: (batch, groups, length, codebook size) masks of the codes that the
    restricted softmax may draw after the prefix of each item of ``items`` (batch, groups, length) with
    ``d`` codes: trie edges towards an item that is neither excluded for the prompt (``remaining``:
    (batch, n_nodes) `TrieTensors.remaining`) nor drawn earlier in the same list."""
    batch, groups, length = items.shape
    rows = torch.arange(batch, device=items.device)[:, None, None, None]
    earlier = torch.ones(length, length, dtype=torch.bool, device=items.device).tril(-1)  # [k, j]: j < k
    masks = []
    for d, size in enumerate(sizes):
        node = torch.zeros_like(items) if d == 0 else under(trie, items, d - 1).clamp(min=0)
        codes, child, exists = children(trie, node)
        drawn = under(trie, items, d)  # (batch, groups, length): each item's node at this depth
        taken = ((child[..., None] == drawn[:, :, None, None, :]) & earlier[:, None, :]).sum(-1)
        free = exists & (remaining[rows, child] - taken > 0)
        mask = torch.zeros(*items.shape, size + 1, dtype=torch.bool, device=items.device)
        mask = mask.scatter_(-1, torch.where(free, codes, size), True)[..., :size]
        # a prefix with no allowed code (no item, or nothing left) is never scored: any mask keeps it finite
        masks.append(mask | ~mask.any(-1, keepdim=True))
    return masks


class RolloutScores(NamedTuple):
    """Per item of (batch, groups, length) rollouts: sums over its codes of the unrestricted (``log_p``,
    the beam's score) and restricted (``log_q``, the draw's) log-probabilities, its code count, and, with
    a reference, its exact per-level KL(policy || reference) summed over its codes (else None)."""

    log_p: torch.Tensor
    log_q: torch.Tensor
    codes: torch.Tensor
    kl: torch.Tensor | None


def rollout_scores(
    model: CLLM4Rec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    items: torch.Tensor,
    trie: TrieTensors,
    token_ids: torch.Tensor,
    remaining: torch.Tensor | None = None,
    reference: CLLM4Rec | None = None,
) -> RolloutScores:
    """:class:`RolloutScores` of ``items`` (batch, groups, length; -1: no item) after each prompt, from one
    forward of the policy (with gradient) and, with ``reference``, one of the reference (without).

    ``token_ids``: (n_items, max_len) the items' semantic token ids (`ItemIndex.token_ids`) on the
    device; ``remaining``: (batch, n_nodes) items left under each trie node per prompt (default: none
    excluded). An item's restricted softmax also leaves out the items before it in its list."""
    batch, groups, length = items.shape
    depth = trie.max_len
    tokens = torch.where(items[..., None] >= 0, token_ids[items.clamp(min=0)], -1)  # (b, g, k, depth)
    flat = tokens.view(batch, groups * length, depth)
    hidden = tuple_hidden(model, input_ids, attention_mask, flat)
    policy = level_log_probs(model, hidden, trie)
    if remaining is None:
        remaining = trie.item_count[None].expand(batch, -1)
    sizes = [p.shape[-1] for p in policy]
    masks = allowed_codes(trie, items, remaining, sizes)
    reference_lp = None
    if reference is not None:
        with torch.no_grad():
            reference_lp = level_log_probs(
                reference, tuple_hidden(reference, input_ids, attention_mask, flat), trie
            )
    zero = torch.zeros(batch, groups, length, device=items.device)
    log_p, log_q, kl = zero.clone(), zero.clone(), zero.clone()
    present = tokens >= 0  # (b, g, k, depth)
    for d in range(depth):
        level_start = model.vocab.level_range(trie.level(d)).start
        code = (tokens[..., d] - level_start).clamp(min=0)
        full = policy[d].view(batch, groups, length, -1)
        mask = masks[d]
        restricted = torch.log_softmax(full.masked_fill(~mask, float("-inf")), dim=-1)
        here = present[..., d]
        log_p = log_p + torch.where(here, full.gather(-1, code[..., None])[..., 0], 0.0)
        log_q = log_q + torch.where(here, restricted.gather(-1, code[..., None])[..., 0], 0.0)
        if reference_lp is not None:
            ref = torch.log_softmax(
                reference_lp[d].view(batch, groups, length, -1).masked_fill(~mask, float("-inf")), dim=-1
            )
            # outside the allowed codes both are -inf: 0 there, so no -inf - -inf reaches the gradient
            mine, theirs = restricted.masked_fill(~mask, 0.0), ref.masked_fill(~mask, 0.0)
            per_level = (mine.exp() * (mine - theirs)).masked_fill(~mask, 0.0).sum(-1)
            kl = kl + torch.where(here, per_level, 0.0)
    return RolloutScores(log_p, log_q, present.sum(-1), kl if reference is not None else None)


# ---------------------------------------------------------------------------------------- rollouts
def rollout_noise(
    keys: torch.Tensor, seed: int, shape: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(len(keys), *shape) Gumbel noise, row ``i`` drawn from ``(seed, *keys[i])`` alone (its ``(epoch,
    row)``), so a row's draws do not depend on its batch, its process or a resume."""
    noise = [np.random.default_rng((seed, *map(int, key))).gumbel(size=shape) for key in keys.tolist()]
    return torch.as_tensor(np.stack(noise), dtype=torch.float32, device=device)


@torch.no_grad()
def sample_rollouts(
    model: CLLM4Rec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: TrieTensors,
    remaining: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """(batch, groups, length) items drawn from the generator after each prompt: every item code by code
    from the per-level softmax restricted to the trie's continuations that still reach an item left in
    ``remaining`` (batch, n_nodes) and not drawn before in its list (Gumbel-max with ``noise``:
    (batch, groups, length, max_len, max_children)). Every item is real and allowed; -1 only where no
    allowed item is left. The prompt runs once; each level runs the drawn prefixes against its cache."""
    batch, groups, length = noise.shape[:3]
    rows = batch * groups
    decoder = ModelDecoder(model, input_ids, attention_mask, trie)
    first = decoder.start().repeat_interleave(groups, dim=0)  # (rows, codebook 0)
    left = remaining.repeat_interleave(groups, dim=0).clone()  # (rows, n_nodes), minus the list's draws
    owner = torch.arange(batch, device=input_ids.device).repeat_interleave(groups)
    items = torch.full((rows, length), -1, dtype=torch.long, device=input_ids.device)
    for k in range(length):
        decoder.prefix = input_ids.new_zeros(batch, 1, 0)  # every item starts at the root
        node = torch.zeros(rows, dtype=torch.long, device=input_ids.device)
        stuck = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        logp, parents = first, owner
        for depth in range(trie.max_len):
            codes, child, exists = children(trie, node)
            free = exists & (left.gather(1, child) > 0)
            done = trie.node_item[node] >= 0
            stuck |= ~done & ~free.any(1)
            score = (logp.gather(1, codes) + noise[:, :, k, depth].reshape(rows, -1)).masked_fill(
                ~free, -torch.inf
            )
            pick = score.argmax(1, keepdim=True)
            move = ~done & ~stuck
            node = torch.where(move, child.gather(1, pick)[:, 0], node)
            if depth + 1 == trie.max_len or bool(((trie.node_item[node] >= 0) | stuck).all()):
                break
            code = torch.where(move, codes.gather(1, pick)[:, 0], 0)
            logp, parents = decoder.advance(parents, depth, code), torch.arange(rows, device=node.device)
        found = (trie.node_item[node] >= 0) & ~stuck
        items[:, k] = torch.where(found, trie.node_item[node], -1)
        path = trie.paths[items[:, k].clamp(min=0)]  # take the drawn item out of its list's remaining
        left.scatter_add_(1, path.clamp(min=0), -((path >= 0) & found[:, None]).to(left.dtype))
    return items.view(batch, groups, length)


def grpo_terms(
    log_q: torch.Tensor,
    codes: torch.Tensor,
    advantages: torch.Tensor,
    kl: torch.Tensor,
    kl_weight: float,
) -> torch.Tensor:
    """(batch,) GRPO loss per prompt from per-item (batch, groups, length) restricted log-probabilities
    ``log_q``, code counts ``codes`` (0: no item), per-item ``kl`` and per-rollout (batch, groups)
    ``advantages``: ``-mean_g A_g * log pi(rollout_g) / codes(rollout_g) + kl_weight * mean KL`` over the
    items drawn."""
    counts = codes.sum(-1).clamp(min=1).to(log_q.dtype)
    policy = -(advantages * log_q.sum(-1) / counts).mean(-1)
    drawn = (codes > 0).to(kl.dtype)
    return policy + kl_weight * (kl * drawn).sum((-2, -1)) / drawn.sum((-2, -1)).clamp(min=1)


class _Prepared:
    """The item index as tensors on one device, built on first use (the loss moves with the model)."""

    def __init__(self) -> None:
        self.device: torch.device | None = None

    def get(self, model: CLLM4Rec) -> tuple[TrieTensors, torch.Tensor]:
        device = device_of(model)
        if self.device != device:
            index = require_index(model)
            self.trie = TrieTensors(index, device)
            self.tokens = torch.as_tensor(index.token_ids(model.vocab), device=device)
            self.device = device
        return self.trie, self.tokens


class GeneratorGRPOLoss(nn.Module):
    """The ``semantic_preference`` task's GRPO loss (see the module): summed loss of a batch of
    :func:`build_generator_grpo_rows` rows and its row count. ``reference``: the frozen SFT model (kept
    outside this module's parameters, so neither the optimiser nor a checkpoint sees it)."""

    def __init__(
        self,
        reference: CLLM4Rec,
        group: int = 8,
        length: int = 1,
        kl_weight: float = 0.05,
        seed: int = 0,
    ):
        super().__init__()
        if group < 2 or length < 1 or kl_weight < 0:
            raise ValueError(
                f"GRPO needs group >= 2, length >= 1, kl_weight >= 0 (got {group}, {length}, {kl_weight})"
            )
        self.group, self.length, self.kl_weight, self.seed = group, length, kl_weight, seed
        self._reference = (reference,)  # a tuple: not a submodule
        self._index = _Prepared()

    @property
    def reference(self) -> CLLM4Rec:
        return self._reference[0]

    def forward(self, model: CLLM4Rec, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        trie, _ = self._index.get(model)
        remaining = self.remaining(trie, batch)
        shape = (self.group, self.length, trie.max_len, trie.max_children)
        noise = rollout_noise(batch["rollout_key"], self.seed, shape, trie.item_count.device)
        with no_dropout(model):
            items = sample_rollouts(
                model, batch["input_ids"], batch["attention_mask"], trie, remaining, noise
            )
        return self.loss_of(model, batch, items, remaining)

    def remaining(self, trie: TrieTensors, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        excluded = batch.get("excluded")
        if excluded is None:
            return trie.item_count[None].expand(len(batch["input_ids"]), -1).int()
        return trie.remaining([row[row >= 0].tolist() for row in excluded.cpu()])

    def loss_of(
        self,
        model: CLLM4Rec,
        batch: dict[str, torch.Tensor],
        items: torch.Tensor,
        remaining: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of given rollouts ``items`` (batch, groups, length) rewarded against ``batch["chosen"]``."""
        trie, tokens = self._index.get(model)
        if remaining is None:
            remaining = self.remaining(trie, batch)
        reference = self.reference
        if device_of(reference) != device_of(model):
            reference.to(device_of(model))
        with no_dropout(model), no_dropout(reference):
            scores = rollout_scores(
                model, batch["input_ids"], batch["attention_mask"], items, trie, tokens, remaining, reference
            )
        rewards = np.stack(
            [
                rollout_rewards(lists.tolist(), int(target))
                for lists, target in zip(items.cpu(), batch["chosen"].cpu(), strict=True)
            ]
        )
        advantages = group_advantages(torch.as_tensor(rewards, dtype=scores.log_q.dtype, device=items.device))
        loss = grpo_terms(scores.log_q, scores.codes, advantages, scores.kl, self.kl_weight)
        return loss.sum(), torch.tensor(loss.shape[0], device=loss.device)


# ---------------------------------------------------------------------------------------- DPO, S-DPO
def sequence_log_probs(
    model: CLLM4Rec,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    items: torch.Tensor,
    trie: TrieTensors,
    token_ids: torch.Tensor,
) -> torch.Tensor:
    """(batch, n) sequence log-probabilities of items (batch, n) after each prompt: the sums of their codes'
    per-level log-probabilities (the beam's score), from one forward."""
    return rollout_scores(model, input_ids, attention_mask, items[:, :, None], trie, token_ids).log_p[..., 0]


class GeneratorDPOLoss(nn.Module):
    """The ``semantic_preference`` task's DPO (``loss="dpo"``) or S-DPO (``"sdpo"``) loss over items' code
    sequence log-probabilities, on :func:`build_generator_preferences` rows: summed loss and row count."""

    def __init__(self, beta: float = 0.1, sft_weight: float = 0.0, loss: str = "sdpo"):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"DPO beta must be positive, got {beta}")
        if loss not in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss must be one of {sorted(PREFERENCE_LOSSES)}, got {loss!r}")
        self.beta, self.sft_weight, self.loss = beta, sft_weight, PREFERENCE_LOSSES[loss]
        self._index = _Prepared()

    def forward(self, model: CLLM4Rec, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        trie, tokens = self._index.get(model)
        items = torch.cat([batch["chosen"][:, None], batch["rejected"]], dim=1)
        with no_dropout(model):
            log_p = sequence_log_probs(
                model, batch["input_ids"], batch["attention_mask"], items, trie, tokens
            )
        loss = self.loss(
            log_p[:, 0], log_p[:, 1:], batch["ref_chosen"], batch["ref_rejected"], self.beta, self.sft_weight
        )
        return loss.sum(), torch.tensor(loss.shape[0], device=loss.device)


@torch.no_grad()
def build_generator_preferences(
    model: CLLM4Rec,
    prompts: FinetunePrompts,
    histories: Sequence[Sequence[int]],
    per_user: int = 1,
    n_rejected: int = 8,
    batch_size: int = 32,
    n_random: int = 0,
    seed: int = 0,
) -> GeneratorRows:
    """Preference rows from the (reference, SFT) generator ``model``: for every cut, the rejected items are
    its constrained beam's top ``n_rejected`` items outside the user's training history plus ``n_random``
    drawn uniformly (seeded by ``seed``) from the rest of those, with the reference's sequence
    log-probabilities of the chosen and rejected items."""
    if n_rejected + n_random < 1:
        raise ValueError("generator DPO needs at least one rejected item (n_rejected + n_random >= 1)")
    rng = np.random.default_rng(seed)
    index = require_index(model)
    device = device_of(model)
    trie = TrieTensors(index, device)
    tokens = torch.as_tensor(index.token_ids(model.vocab), device=device)
    pad_id = model.tokenizer.pad_token_id or 0
    cuts = preference_cuts(histories, per_user)
    rows: list[dict] = []
    with no_dropout(model):
        for start in tqdm(range(0, len(cuts), batch_size), desc="reference", unit="batch", leave=False):
            chunk = cuts[start : start + batch_size]
            encoded = [prompts.encode(user, histories[user][:t]) for user, t in chunk]
            batch = {k: v.to(device) for k, v in prompt_batch(encoded, pad_id).items()}
            seen = [sorted({int(i) for i in histories[user]}) for user, _ in chunk]
            top = torch.zeros(len(chunk), 0, dtype=torch.long, device=device)
            if n_rejected:
                decoder = ModelDecoder(model, batch["input_ids"], batch["attention_mask"], trie)
                top, _ = constrained_beam_search(decoder, trie, n_rejected, n_rejected, trie.remaining(seen))
            chosen = [int(histories[user][t]) for user, t in chunk]
            rejected = []
            for row, found in enumerate(top.tolist()):
                found = [i for i in found if i >= 0]
                rest = np.setdiff1d(np.arange(index.n_items), np.asarray(seen[row] + found, dtype=np.int64))
                drawn = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if n_random else []
                rejected.append(found + sorted(int(i) for i in drawn))
            items = pad([[c, *r] for c, r in zip(chosen, rejected, strict=True)], -1).to(device)
            log_p = sequence_log_probs(
                model, batch["input_ids"], batch["attention_mask"], items, trie, tokens
            )
            for row, (ids, c, r) in enumerate(zip(encoded, chosen, rejected, strict=True)):
                rows.append(
                    {
                        "task": TASKS.index("semantic_preference"),
                        "input_ids": ids,
                        "chosen": c,
                        "rejected": r,
                        "ref_chosen": float(log_p[row, 0]),
                        "ref_rejected": log_p[row, 1 : 1 + len(r)].tolist(),
                    }
                )
    return GeneratorRows(rows)


def frozen_reference(model: CLLM4Rec) -> CLLM4Rec:
    """A frozen copy of ``model`` (its SFT state), the reference GRPO's KL is measured against."""
    return copy.deepcopy(model).eval().requires_grad_(False)
