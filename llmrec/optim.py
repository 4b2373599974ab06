"""AdamW that also steps sparse-gradient ID tables row by row, and gradient clipping that handles them.

Why not ``torch.optim.SparseAdam`` beside AdamW: it refuses dense parameters, so the LoRA weights and
the item tables would need a second optimizer, a second scheduler and two optimizer states in every
accelerate checkpoint. One AdamW subclass keeps ``model.param_groups``, the scheduler, ``accelerator.
prepare`` and the checkpoint format unchanged: dense gradients go through ``torch.optim.AdamW`` itself
(bit for bit), sparse ones (``ModelConfig.sparse_updates``) through the update below, which is
SparseAdam's (TorchRec's row-wise Adam): only the rows in the batch move and have their moments
updated, with bias correction by the parameter's step count. A row touched at every step therefore
follows dense Adam exactly; an untouched row keeps its value and moments (dense Adam would keep moving
it on old momentum). The moments are dense tensors the size of the table, allocated on the first step
(TorchRec's layout too); what sparse updates save is the dense gradient and the per-step work over
every row, which is what grows with the number of users.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class RowSparseAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` for dense gradients; row-wise (lazy) Adam for sparse ones."""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("RowSparseAdamW takes no closure")
        sparse = [
            (group, p)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and p.grad.is_sparse
        ]
        grads = [p.grad for _, p in sparse]
        for _, p in sparse:
            p.grad = None  # hidden from AdamW, which refuses sparse gradients
        try:
            super().step()
        finally:
            for (_, p), grad in zip(sparse, grads, strict=True):
                p.grad = grad
        for (group, p), grad in zip(sparse, grads, strict=True):
            self._sparse_step(group, p, grad)
        return None

    def _sparse_step(self, group: dict, param: torch.Tensor, grad: torch.Tensor) -> None:
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        # rows looked up only to be masked out (positions of other ID families) carry exact zeros: not touched
        touched = values.ne(0).flatten(1).any(1)
        rows, values = rows[touched], values[touched]
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        exp_avg = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(values, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2)
        exp_avg_sq.addcmul_(values, values, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
        current = param.index_select(0, rows)
        if decay:
            current.mul_(1 - lr * decay)  # decoupled decay, on the touched rows only
        param.index_copy_(0, rows, current.addcdiv_(exp_avg, denom, value=-lr / bias1))


def has_sparse_grads(parameters: Iterable[nn.Parameter]) -> bool:
    return any(p.grad is not None and p.grad.is_sparse for p in parameters)


@torch.no_grad()
def clip_sparse_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) over dense and sparse gradients (torch's refuses sparse).

    A sparse gradient is coalesced in place first, so rows looked up twice count once in the norm.
    """
    params = [p for p in parameters if p.grad is not None]
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    values = [p.grad.values() if p.grad.is_sparse else p.grad for p in params]
    if not values:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in values]))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for v in values:
        v.mul_(scale.to(v.dtype))
    return total
