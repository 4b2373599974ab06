"""RQ-VAE semantic IDs (TIGER, Rajput et al. 2023) with collision resolution (TIGER extra level, LC-Rec Sinkhorn).

An MLP encoder maps an item's content embedding to a latent; ``levels`` codebooks quantize the
latent residually (level 0 quantizes the latent, level 1 what is left, ...); an MLP decoder
reconstructs the content embedding from the sum of the chosen codewords. Training minimises
reconstruction MSE plus, per level, the codebook loss ``||sg[r] - e||²`` and the commitment loss
``β ||r - sg[e]||²``, with a straight-through estimator through the quantizer. The encoder and
decoder are first trained as a plain autoencoder (``ae_epochs``); the codebooks then start from
residual k-means of its latents, so quantized training begins near a good reconstruction instead
of pulling a random latent onto codes (on ML-100K this halves the training needed for the same
MSE). Codes that no item used since the last check are moved onto random residuals (dead-code
re-initialisation), which keeps the codebooks in use.

Items with the same content (or close enough) share a code tuple; ``resolve`` makes IDs unique
(`llmrec.indexing.collisions`: TIGER's extra level or LC-Rec's Sinkhorn re-assignment).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from llmrec.indexing.base import IndexData, Indexer, ItemIndex
from llmrec.indexing.collisions import resolve_collisions
from llmrec.indexing.encoders import torch_threads
from llmrec.indexing.kmeans import kmeans
from llmrec.options import RQVAEConfig

logger = logging.getLogger(__name__)


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if k < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """MLP encoder -> residual quantizer (``levels`` codebooks of ``codebook_size``) -> MLP decoder."""

    def __init__(self, in_dim: int, config: RQVAEConfig) -> None:
        super().__init__()
        self.config = config
        dims = [in_dim, *config.hidden_dims, config.latent_dim]
        self.encoder = _mlp(dims)
        self.decoder = _mlp(dims[::-1])
        self.codebooks = nn.Parameter(
            torch.randn(config.levels, config.codebook_size, config.latent_dim) * 0.1
        )

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual quantization of latents z (n, latent).

        Returns (quantized latent with straight-through gradient, codes (n, levels), residuals
        (levels, n, latent) seen by each level, codebook + commitment loss).
        """
        residual = z
        quantized = torch.zeros_like(z)
        codes, residuals = [], []
        loss = z.new_zeros(())
        for book in self.codebooks:
            idx = torch.cdist(residual, book).argmin(1)
            e = book[idx]
            loss = (
                loss + F.mse_loss(e, residual.detach()) + self.config.beta * F.mse_loss(residual, e.detach())
            )
            residuals.append(residual)
            codes.append(idx)
            quantized = quantized + e
            residual = residual - e.detach()
        z_q = z + (quantized - z).detach()  # straight-through estimator
        return z_q, torch.stack(codes, 1), torch.stack(residuals), loss

    def forward(self, x: torch.Tensor, quantize: bool = True) -> dict[str, torch.Tensor]:
        """Losses, codes and residuals of a batch; ``quantize=False`` trains the plain autoencoder."""
        z = self.encoder(x)
        if not quantize:
            recon = F.mse_loss(self.decoder(z), x)
            return {"loss": recon, "recon": recon}
        z_q, codes, residuals, quant_loss = self.quantize(z)
        recon = F.mse_loss(self.decoder(z_q), x)
        return {
            "loss": recon + quant_loss,
            "recon": recon,
            "quant": quant_loss,
            "codes": codes,
            "residuals": residuals,
        }

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor, seed: int) -> None:
        """Set each codebook to the k-means centroids of the residuals it sees at the start."""
        residual = self.encoder(x)
        for level, book in enumerate(self.codebooks):
            centroids, assign = kmeans(residual, len(book), seed=seed + level)
            book.copy_(centroids)
            residual = residual - centroids[assign]

    @torch.no_grad()
    def reinit_dead_codes(self, usage: torch.Tensor, residuals: torch.Tensor, gen: torch.Generator) -> int:
        """Move codes unused since the last check (usage (levels, K) == 0) onto residuals.

        Residuals are drawn with probability proportional to their squared quantization error
        (k-means++ style), so a dead code lands where the codebook fits worst, e.g. between two
        clusters that share one code, rather than on a point that is already well served.
        """
        moved = 0
        for level, book in enumerate(self.codebooks):
            dead = (usage[level] == 0).nonzero().flatten()
            if not len(dead):
                continue
            r = residuals[level]
            error = torch.cdist(r, book).min(1).values.square().cpu().double() + 1e-12
            pick = torch.multinomial(error, min(len(dead), len(r)), replacement=False, generator=gen)
            book[dead[: len(pick)]] = r[pick.to(r.device)]
            moved += len(pick)
        return moved


@dataclasses.dataclass
class RQVAEResult:
    model: RQVAE
    codes: np.ndarray  # (n_items, levels) before collision resolution
    residuals: torch.Tensor  # (levels, n_items, latent) after training
    recon_before: float
    recon_after: float


def train_rqvae(embeddings: np.ndarray | torch.Tensor, config: RQVAEConfig) -> RQVAEResult:
    """Train an RQ-VAE on item embeddings (n_items, d) and assign every item its code tuple."""
    with torch_threads(config.threads if config.device == "cpu" else None):
        return _train(embeddings, config)


def _train(embeddings: np.ndarray | torch.Tensor, config: RQVAEConfig) -> RQVAEResult:
    torch.manual_seed(config.seed)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32, device=config.device)
    model = RQVAE(x.shape[1], config).to(config.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: _lr_factor(epoch, config))

    def run_epoch(loss: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        outs = _epoch(loss, len(x), config.batch_size, optimizer, gen)
        scheduler.step()
        return outs

    for _ in tqdm(range(config.ae_epochs), desc="autoencoder", leave=False, mininterval=2):
        run_epoch(lambda idx: model(x[idx], quantize=False))
    if config.kmeans_init:  # on the latents of the (pre)trained encoder
        model.kmeans_init(x, config.seed)
    recon_before = _evaluate(model, x)["recon"]
    usage = torch.zeros(config.levels * config.codebook_size, dtype=torch.long, device=x.device)
    offsets = torch.arange(config.levels, device=x.device) * config.codebook_size
    bar = tqdm(range(config.epochs), desc="rq-vae", leave=False, mininterval=2)
    for epoch in bar:
        for out in run_epoch(lambda idx: model(x[idx])):
            usage += torch.bincount((out["codes"] + offsets).flatten(), minlength=len(usage))
        if config.dead_code_every and (epoch + 1) % config.dead_code_every == 0 and epoch + 1 < config.epochs:
            with torch.no_grad():  # every item's residuals, not only the last batch's
                residuals = model.quantize(model.encoder(x))[2]
            moved = model.reinit_dead_codes(usage.view(config.levels, -1), residuals, gen)
            usage.zero_()
            bar.set_postfix(recon=f"{out['recon'].item():.5f}", dead=moved)
            logger.debug("epoch %d: recon %.6f, %d dead codes moved", epoch + 1, out["recon"].item(), moved)
    with torch.no_grad():  # codes are final from here on: the decoder learns to read them exactly
        z_q = model.quantize(model.encoder(x))[0]
    for _ in range(config.decoder_epochs):  # encoder and codebooks get no gradient, so AdamW skips them
        run_epoch(lambda idx: {"loss": F.mse_loss(model.decoder(z_q[idx]), x[idx])})
    final = _evaluate(model, x)
    logger.info("rq-vae reconstruction MSE %.6f -> %.6f", recon_before, final["recon"])
    return RQVAEResult(model, final["codes"].cpu().numpy(), final["residuals"], recon_before, final["recon"])


def _lr_factor(epoch: int, config: RQVAEConfig) -> float:
    """lr multiplier over all epochs (autoencoder, quantized, decoder): linear warmup, then cosine decay or flat."""
    total = config.ae_epochs + config.epochs + config.decoder_epochs
    warm = min(1.0, (epoch + 1) / config.warmup_epochs) if config.warmup_epochs else 1.0
    return warm * (0.5 * (1 + math.cos(math.pi * epoch / total)) if config.cosine_lr else 1.0)


def _epoch(
    loss: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    n: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
) -> list[dict[str, torch.Tensor]]:
    """One optimizer pass over ``n`` items in a random order; ``loss`` maps a batch's rows to outputs."""
    order = torch.randperm(n, generator=gen)
    outs = []
    for start in range(0, n, batch_size):
        out = loss(order[start : start + batch_size])
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        outs.append(out)
    return outs


@torch.no_grad()
def _evaluate(model: RQVAE, x: torch.Tensor) -> dict[str, Any]:
    model.eval()
    out = model(x)
    return {"recon": float(out["recon"]), "codes": out["codes"], "residuals": out["residuals"]}


class RQVAEIndexer(Indexer):
    """Semantic IDs from an RQ-VAE over item content embeddings (``IndexData.embeddings``)."""

    method = "rqvae"

    def __init__(self, config: RQVAEConfig | None = None) -> None:
        self.config = config or RQVAEConfig()

    def build(self, data: IndexData) -> ItemIndex:
        return self.index_from(train_rqvae(data.require("embeddings", self.method), self.config))

    def index_from(self, result: RQVAEResult) -> ItemIndex:
        """Resolve the collisions of a trained RQ-VAE's codes (``config.resolve``) into an index.

        Separate from :meth:`build` so one trained model can be resolved several ways.
        """
        cfg = self.config
        last = result.residuals[-1]
        distances = torch.cdist(last, result.model.codebooks[-1].detach()).cpu().numpy()
        codes, sizes, stats = resolve_collisions(result.codes, distances, cfg)
        stats.update(recon_mse_before=result.recon_before, recon_mse=result.recon_after)
        weights = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
        index = self.make_index(codes, sizes, cfg, **stats)
        index.config["in_dim"] = result.model.encoder[0].in_features
        index.artifacts["rqvae.safetensors"] = save_safetensors(weights)
        return index
