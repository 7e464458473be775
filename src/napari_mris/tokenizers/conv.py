"""The convolutional encoder and decoder of the image tokenizer.

They map a one-channel S x S picture to a G x G latent grid and back. The first step is a
lossless pixel-unshuffle into `patch x patch` channels, so that no convolution runs at full resolution
(the expensive part on a CPU); then `len(channels) - 1` stride-2 stages reach the grid. The decoder
mirrors it and ends with a pixel-shuffle back to S x S.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def stem_patch(image_size: int, grid: int, n_channels: int) -> int:
    """The pixel-unshuffle factor: image_size / grid divided by the 2**(n_channels-1) of the conv stages."""
    if image_size % grid:
        raise ValueError(f"image_size {image_size} is not a multiple of the grid {grid}")
    factor = image_size // grid
    stages = 2 ** (n_channels - 1)
    if factor % stages or not math.log2(factor // stages).is_integer():
        raise ValueError(f"image_size / grid = {factor} must be a power of two times 2**(len(channels)-1) = {stages}")
    return factor // stages


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """Pre-norm residual block: GN-SiLU-conv twice."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvEncoder(nn.Module):
    """(B, 1, S, S) -> (B, out_dim, G, G)."""

    def __init__(self, image_size: int, grid: int, channels: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        patch = stem_patch(image_size, grid, len(channels))
        layers: list[nn.Module] = [nn.PixelUnshuffle(patch), nn.Conv2d(patch * patch, channels[0], 3, padding=1)]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [ResBlock(c_in), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]
        layers += [ResBlock(channels[-1]), ResBlock(channels[-1]), _norm(channels[-1]), nn.SiLU()]
        layers += [nn.Conv2d(channels[-1], out_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """(B, in_dim, G, G) -> (B, 1, S, S) (unbounded outputs; the caller applies sigmoid or clamps)."""

    def __init__(self, image_size: int, grid: int, channels: tuple[int, ...], in_dim: int) -> None:
        super().__init__()
        patch = stem_patch(image_size, grid, len(channels))
        rev = tuple(reversed(channels))
        layers: list[nn.Module] = [nn.Conv2d(in_dim, rev[0], 3, padding=1), ResBlock(rev[0]), ResBlock(rev[0])]
        for c_in, c_out in zip(rev[:-1], rev[1:], strict=True):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)]
            layers += [ResBlock(c_out)]
        layers += [_norm(rev[-1]), nn.SiLU(), nn.Conv2d(rev[-1], patch * patch, 3, padding=1), nn.PixelShuffle(patch)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
