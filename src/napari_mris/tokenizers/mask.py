"""Mask tokenizer: binary masks <-> one or several grids of discrete codes.

One class serves both decoding orders. `scales=(14,)` is the single-scale tokenizer of NTP-MRISeg
(raster order); `scales=(1, 2, 3, 4, 6, 8, 10, 14)` is the multi-scale residual tokenizer of VAR /
AR-Seg (coarse-to-fine order): scale k quantizes what scales 1..k-1 left unexplained, with one codebook
shared across scales, so decoding the first k scales gives a coarse preview of the mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from napari_mris.tokenizers.conv import ConvDecoder, ConvEncoder


@dataclass
class MaskTokenizerConfig:
    image_size: int = 224
    scales: tuple[int, ...] = (14,)
    latent_dim: int = 16
    codebook_size: int = 1024
    channels: tuple[int, ...] = (32, 64, 128)
    beta: float = 0.25  # commitment weight (VQ-VAE)
    ema_decay: float = 0.99  # codebook EMA (no codebook gradients needed)
    dead_code_threshold: float = 0.02  # EMA usage below which a code is restarted on a poorly fitted vector

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        self.channels = tuple(int(c) for c in self.channels)
        if not self.scales or list(self.scales) != sorted(set(self.scales)):
            raise ValueError(f"mask tokenizer scales must be strictly increasing, got {self.scales}")

    @property
    def grid(self) -> int:
        return self.scales[-1]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskTokenizerConfig:
        return cls(**data)


class QuantizerOutput(NamedTuple):
    f_hat: torch.Tensor  # (B, D, G, G) quantized latent, straight-through to the encoder
    codes: list[torch.Tensor]  # one (B, s*s) per scale
    loss: torch.Tensor  # commitment + Phi loss
    partial_sums: list[torch.Tensor]  # detached running sum after each scale (for the coarse-preview loss)


class ResidualScaleQuantizer(nn.Module):
    """Multi-scale residual VQ with a shared EMA codebook (VAR's `VectorQuantizer2`, simplified).

    For each scale: area-downsample the residual to s x s, pick the nearest codes, upsample them back to
    the latent grid, refine with a small shared conv (VAR's Phi), add to the running sum and subtract from
    the residual. The codebook follows the assigned vectors by exponential moving averages; codes that
    fall out of use are restarted on the worst-fitted vectors of the batch (no codebook collapse).
    """

    def __init__(self, cfg: MaskTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.latent_dim
        self.register_buffer("codebook", torch.randn(k, d) * 0.1)
        self.register_buffer("ema_count", torch.zeros(k))
        self.register_buffer("ema_sum", torch.zeros(k, d))
        self.phi = nn.Conv2d(d, d, 3, padding=1)

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) index of the nearest code (squared Euclidean distance)."""
        dist = vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ self.codebook.T + self.codebook.pow(2).sum(1)
        return dist.argmin(1)

    def scale_contribution(self, codes: torch.Tensor, size: int) -> torch.Tensor:
        """(B, s*s) codes -> their (B, D, G, G) contribution to the latent sum."""
        b, grid = codes.shape[0], self.cfg.grid
        q = self.codebook[codes].view(b, size, size, -1).permute(0, 3, 1, 2)
        if size != grid:
            q = F.interpolate(q, size=(grid, grid), mode="bicubic", align_corners=False)
        return 0.5 * q + 0.5 * self.phi(q)

    def forward(self, f: torch.Tensor) -> QuantizerOutput:
        grid = self.cfg.grid
        rest = f.detach().clone()
        f_hat = torch.zeros_like(f)
        codes, seen, assigned, partial_sums = [], [], [], []
        for size in self.cfg.scales:
            r = F.interpolate(rest, size=(size, size), mode="area") if size != grid else rest
            vectors = r.permute(0, 2, 3, 1).reshape(-1, r.shape[1])
            idx = self.nearest(vectors)
            h = self.scale_contribution(idx.view(f.shape[0], -1), size)
            f_hat = f_hat + h
            rest = rest - h.detach()
            partial_sums.append(f_hat.detach())
            codes.append(idx.view(f.shape[0], -1))
            seen.append(vectors)
            assigned.append(idx)
        loss = self.cfg.beta * F.mse_loss(f, f_hat.detach()) + F.mse_loss(f_hat, f.detach())
        if self.training and torch.is_grad_enabled():  # encode() under no_grad never moves the codebook
            self._ema_update(torch.cat(seen), torch.cat(assigned))
        f_st = f + (f_hat - f).detach() + (f_hat - f_hat.detach())  # value f_hat; grads to encoder and Phi
        return QuantizerOutput(f_st, codes, loss, partial_sums)

    @torch.no_grad()
    def _ema_update(self, vectors: torch.Tensor, idx: torch.Tensor) -> None:
        decay, k = self.cfg.ema_decay, self.cfg.codebook_size
        counts = torch.bincount(idx, minlength=k).to(vectors.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, vectors)
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        used = self.ema_count > 1e-8
        self.codebook[used] = self.ema_sum[used] / self.ema_count[used, None]
        dead = (self.ema_count < self.cfg.dead_code_threshold).nonzero().squeeze(1)
        if len(dead):
            error = (vectors - self.codebook[idx]).pow(2).sum(1) + 1e-12
            pick = torch.multinomial(error, len(dead), replacement=len(dead) > len(vectors))
            self.codebook[dead] = vectors[pick]
            self.ema_sum[dead] = vectors[pick]
            self.ema_count[dead] = 1.0


class MaskTokenizerOutput(NamedTuple):
    logits: torch.Tensor  # (B, 1, S, S)
    codes: list[torch.Tensor]
    vq_loss: torch.Tensor
    partial_sums: list[torch.Tensor]  # latent after scales 1..k, detached


class MaskTokenizer(nn.Module):
    """Binary mask (B, 1, S, S) <-> codes, one (B, s*s) LongTensor per scale."""

    def __init__(self, cfg: MaskTokenizerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = ConvEncoder(cfg.image_size, cfg.grid, cfg.channels, cfg.latent_dim)
        self.quantizer = ResidualScaleQuantizer(cfg)
        self.decoder = ConvDecoder(cfg.image_size, cfg.grid, cfg.channels, cfg.latent_dim)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def scales(self) -> tuple[int, ...]:
        return self.config.scales

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def _prepare(self, masks: torch.Tensor) -> torch.Tensor:
        """Check the shape, resize to image_size (area: a soft mask) and map {0,1} to [-1, 1]."""
        if masks.ndim != 4 or masks.shape[1] != 1:
            raise ValueError(f"masks must be (B, 1, H, W), got {tuple(masks.shape)}")
        masks = masks.float()
        size = self.config.image_size
        if masks.shape[-2:] != (size, size):
            masks = F.interpolate(masks, size=(size, size), mode="area")
        return masks * 2 - 1

    def forward(self, masks: torch.Tensor) -> MaskTokenizerOutput:
        """Training pass: reconstruction logits, codes and the VQ loss."""
        q = self.quantizer(self.encoder(self._prepare(masks)))
        return MaskTokenizerOutput(self.decoder(q.f_hat), q.codes, q.loss, q.partial_sums)

    @torch.no_grad()
    def encode(self, masks: torch.Tensor) -> list[torch.Tensor]:
        return self.quantizer(self.encoder(self._prepare(masks))).codes

    def latent_from_codes(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the scale contributions of the given (leading) scales."""
        if not 1 <= len(codes) <= len(self.scales):
            raise ValueError(f"expected 1..{len(self.scales)} scales of codes, got {len(codes)}")
        total = None
        for size, c in zip(self.scales, codes, strict=False):  # codes may stop before the last scale
            if c.ndim != 2 or c.shape[1] != size * size:
                raise ValueError(f"codes of scale {size} must be (B, {size * size}), got {tuple(c.shape)}")
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.codebook_size):
                raise ValueError(f"mask codes must lie in 0..{self.codebook_size - 1}")
            h = self.quantizer.scale_contribution(c.long(), size)
            total = h if total is None else total + h
        return total

    @torch.no_grad()
    def decode(self, codes: list[torch.Tensor], out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes of the first k scales -> (B, 1, S, S) probabilities (k < all: the coarse preview)."""
        prob = torch.sigmoid(self.decoder(self.latent_from_codes(codes)))
        if out_size is not None and tuple(out_size) != prob.shape[-2:]:
            prob = F.interpolate(prob, size=tuple(out_size), mode="bilinear", align_corners=False)
        return prob
