"""A small convolutional stem that gives each image token the pixels its code lost.

The image tokenizer compresses a 16x16 patch into one of ~1,000 codes (25 dB PSNR on QaTa), and the
faint ground-glass opacities that define COVID-19 infection are exactly what such a code drops. The stem
reads the preprocessed slice directly and adds one feature vector to the input embedding of each image
token, so the token sequence and the vocabulary stay as the design has them (any image tokenizer, Emu3
included, still fills the image slots) while the decoder sees the image at full resolution. The stem
trains end to end with the decoder; each stage halves the resolution, so `len(channels)` stride-2 stages
take an `image_size` slice to the `image_size / 2**len(channels)` token grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """Stride-2 conv, then a residual-free 3x3 conv; GroupNorm keeps batch size 1 (inference) exact."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.SiLU(),
    )


class PixelStem(nn.Module):
    def __init__(self, channels: Sequence[int], hidden_size: int) -> None:
        super().__init__()
        if not channels:
            raise ValueError("a pixel stem needs at least one stage (channels)")
        sizes = [1, *channels]
        self.stages = nn.Sequential(*(_stage(a, b) for a, b in zip(sizes, sizes[1:], strict=False)))
        self.proj = nn.Linear(sizes[-1], hidden_size)
        nn.init.normal_(self.proj.weight, std=0.02)  # the scale of the token embeddings it is added to
        nn.init.zeros_(self.proj.bias)
        self.downsample = 2 ** len(channels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, (S / 2**n)**2, hidden), in raster order like the image tokens."""
        if pixels.dim() != 4 or pixels.shape[1] != 1:
            raise ValueError(f"pixel stem input must be (B, 1, S, S) grayscale, got {tuple(pixels.shape)}")
        features = self.stages(pixels * 2.0 - 1.0)
        return self.proj(features.flatten(2).transpose(1, 2))
