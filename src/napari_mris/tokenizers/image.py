"""Image tokenizer: a grayscale slice in [0, 1] <-> a G x G grid of discrete codes.

The paper uses the pretrained Emu3 tokenizer; no such weights can be downloaded here, so this is a small
convolutional autoencoder trained on the training images. Its bottleneck is finite scalar quantization
(FSQ, Mentzer et al. 2023): each latent channel is rounded to a few levels, so every code is reachable
and there is no codebook to collapse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from vector_quantize_pytorch import FSQ

from napari_mris.tokenizers.conv import ConvDecoder, ConvEncoder


@dataclass
class ImageTokenizerConfig:
    image_size: int = 224
    grid: int = 14
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    channels: tuple[int, ...] = (32, 64, 128)

    def __post_init__(self) -> None:
        self.fsq_levels = tuple(int(v) for v in self.fsq_levels)
        self.channels = tuple(int(c) for c in self.channels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageTokenizerConfig:
        return cls(**data)


class ImageTokenizerOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, 1, S, S), unclamped
    codes: torch.Tensor  # (B, G*G)


class ImageTokenizer(nn.Module):
    """(B, 1, S, S) in [0, 1] <-> (B, G*G) FSQ codes in 0..prod(levels)-1."""

    def __init__(self, cfg: ImageTokenizerConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = len(cfg.fsq_levels)
        self.encoder = ConvEncoder(cfg.image_size, cfg.grid, cfg.channels, dim)
        self.fsq = FSQ(levels=list(cfg.fsq_levels), dim=dim, channel_first=True)
        self.decoder = ConvDecoder(cfg.image_size, cfg.grid, cfg.channels, dim)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid(self) -> int:
        return self.config.grid

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, H, W), got {tuple(images.shape)}")
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"images must be {size}x{size} (use preprocess.to_model_image), got {images.shape[-2:]}")
        return images.float() * 2 - 1

    def forward(self, images: torch.Tensor) -> ImageTokenizerOutput:
        quantized, codes = self.fsq(self.encoder(self._prepare(images)))
        return ImageTokenizerOutput((self.decoder(quantized) + 1) / 2, codes.flatten(1).long())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images).codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        g = self.config.grid
        if codes.ndim != 2 or codes.shape[1] != g * g:
            raise ValueError(f"image codes must be (B, {g * g}), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"image codes must lie in 0..{self.codebook_size - 1}")
        quantized = self.fsq.indices_to_codes(codes.long().view(-1, g, g))
        return ((self.decoder(quantized) + 1) / 2).clamp(0, 1)
