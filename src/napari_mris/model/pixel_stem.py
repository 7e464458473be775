"""A small convolutional stem that gives each image token the pixels its code lost.

The image tokenizer compresses a 16x16 patch into one of ~1,000 codes (25 dB PSNR on QaTa), and the
faint ground-glass opacities that define COVID-19 infection are exactly what such a code drops. The stem
reads the preprocessed slice directly and adds one feature vector to the input embedding of each image
token, so the token sequence and the vocabulary stay as the design has them (the image tokenizer still
fills the image slots) while the decoder sees the image at full resolution. The stem
trains end to end with the decoder; each stage halves the resolution, so `len(channels)` stride-2 stages
take an `image_size` slice to the `image_size / 2**len(channels)` token grid.

With `decoder_channels` the stem is a U-Net (Ronneberger et al.): up-stages climb back through the
encoder's skips to a lesion map at `image_size / 2**(len(channels) - len(decoder_channels))`. Why: an
encoder read out at the 14 x 14 token grid cannot place a lesion border inside its 16 x 16 patch, and a
text-free U-Net beats it by 9 Dice points on QaTa-COV19 (docs/results.md). The map is trained on the
lesion target and handed to each mask position as its cell's patch of lesion probabilities
(`MRISDecoder.cell_table`); which lesions the text asks for is still the transformer's choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _stage(c_in: int, c_out: int, stride: int = 2) -> nn.Sequential:
    """(Strided) conv, then a 3x3 conv; GroupNorm keeps batch size 1 (inference) exact."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.SiLU(),
    )


class UpStage(nn.Module):
    """U-Net up-step: 1x1 to `c_out` (cheap at the coarse resolution), x2 bilinear, concat the skip, conv."""

    def __init__(self, c_deep: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c_deep, c_out, 1)
        self.merge = _stage(c_out + c_skip, c_out, stride=1)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce(deep), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.merge(torch.cat([up, skip], dim=1))


class PixelStem(nn.Module):
    def __init__(self, channels: Sequence[int], hidden_size: int, decoder_channels: Sequence[int] = ()) -> None:
        super().__init__()
        if not channels:
            raise ValueError("a pixel stem needs at least one stage (channels)")
        if len(decoder_channels) >= len(channels):
            raise ValueError(
                f"{len(decoder_channels)} decoder stages need at least {len(decoder_channels) + 1} encoder "
                f"stages to climb back through, got {len(channels)}"
            )
        sizes = [1, *channels]
        self.stages = nn.ModuleList(_stage(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.proj = nn.Linear(sizes[-1], hidden_size)
        nn.init.normal_(self.proj.weight, std=0.02)  # the scale of the token embeddings it is added to
        nn.init.zeros_(self.proj.bias)
        self.downsample = 2 ** len(channels)
        skips = list(reversed(channels[:-1]))  # the skip each up-stage merges, deepest first
        deep = [channels[-1], *decoder_channels[:-1]]
        self.up = nn.ModuleList(UpStage(d, s, c) for d, s, c in zip(deep, skips, decoder_channels, strict=False))
        self.lesion_map = nn.Conv2d(decoder_channels[-1], 1, 1) if decoder_channels else None
        self.map_upsample = 2 ** len(decoder_channels)  # map pixels per token-grid cell, along each side

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1, S, S) in [0, 1] -> ((B, (S / 2**n)**2, hidden) features in raster order like the image
        tokens, (B, 1, h, w) lesion-map logits or None without `decoder_channels`)."""
        if pixels.dim() != 4 or pixels.shape[1] != 1:
            raise ValueError(f"pixel stem input must be (B, 1, S, S) grayscale, got {tuple(pixels.shape)}")
        x, skips = pixels * 2.0 - 1.0, []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        features = self.proj(x.flatten(2).transpose(1, 2))
        if self.lesion_map is None:
            return features, None
        for up, skip in zip(self.up, reversed(skips[:-1]), strict=False):
            x = up(x, skip)
        return features, self.lesion_map(x)
