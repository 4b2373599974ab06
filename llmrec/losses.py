"""The catalogue losses of the item head: the multinomial NLL over every item, exact or approximate.

`llmrec.model.CLLM4Rec` calls its ``item_softmax`` (an :class:`ItemSoftmax`) with the head's linear part
(`llmrec.head.ItemHead.product`); recipes swap in the chunked or sampled variants for huge catalogues
(`llmrec.pipeline.item_softmax`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ItemSoftmax(nn.Module):
    """Multinomial NLL over the catalogue: exact (optionally chunked) or sampled with logQ correction.

    ``full`` materialises (batch, n_items) logits; ``chunked`` computes the same value with a running
    log-sum-exp over item chunks so peak memory is (batch, chunk); ``sampled`` draws ``num_samples``
    negatives from ``log_q`` (e.g. item popularity) shared by the batch and subtracts log q from their
    logits (Bengio & Senecal; Yi et al. 2019) so the estimate of the softmax stays unbiased in the limit.
    """

    def __init__(
        self,
        mode: str = "full",
        chunk_size: int = 65536,
        num_samples: int = 8192,
        log_q: torch.Tensor | None = None,
    ):
        super().__init__()
        if mode not in ("full", "chunked", "sampled"):
            raise ValueError(f"unknown softmax mode {mode!r}: expected full, chunked or sampled")
        if mode == "sampled" and log_q is None:
            raise ValueError("sampled softmax needs log_q, the log sampling probability of every item")
        self.mode, self.chunk_size, self.num_samples = mode, chunk_size, num_samples
        self.register_buffer("log_q", log_q, persistent=False)

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        """``targets``: (batch, max_targets) item indices padded with -1. Returns the summed NLL."""
        hidden = hidden.to(weight.dtype)
        valid = targets >= 0
        safe = targets.clamp(min=0)
        target_logits = torch.einsum("bh,bth->bt", hidden, weight[safe])
        if bias is not None:
            target_logits = target_logits + bias[safe]
        if self.mode == "full":
            logits = hidden @ weight.T + (bias if bias is not None else 0)
            log_z = torch.logsumexp(logits.float(), dim=-1)
        elif self.mode == "chunked":
            parts = []
            for start in range(0, weight.shape[0], self.chunk_size):
                chunk = hidden @ weight[start : start + self.chunk_size].T
                if bias is not None:
                    chunk = chunk + bias[start : start + self.chunk_size]
                parts.append(torch.logsumexp(chunk.float(), dim=-1))
            log_z = torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)
        else:
            negatives = torch.multinomial(self.log_q.exp(), self.num_samples, replacement=True)
            neg_logits = hidden @ weight[negatives].T - self.log_q[negatives]
            if bias is not None:
                neg_logits = neg_logits + bias[negatives]
            # each user's own targets join the normaliser (corrected by their own log q)
            pos_logits = target_logits - self.log_q[safe]
            pos_logits = pos_logits.masked_fill(~valid, float("-inf"))
            # (1/S) sum exp(logit)/q estimates the partition function; the -log S only shifts the value
            log_z = torch.logsumexp(torch.cat([neg_logits.float(), pos_logits.float()], dim=-1), dim=-1)
            log_z = log_z - math.log(self.num_samples)
        nll = (log_z.unsqueeze(1) - target_logits.float()) * valid
        return nll.sum()
