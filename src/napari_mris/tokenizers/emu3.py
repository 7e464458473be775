"""The pretrained Emu3 VQ tokenizer (the paper's image tokenizer) behind the `ImageTokenizer` interface.

No weights ship with napari-mris: a user who has the Emu3 VQ model (converted to the transformers layout)
points to its local folder. `transformers.Emu3VQVAE` is inference-only and frozen, which is all the
image side of the sequence needs. Grayscale slices are repeated to three channels and normalised with
the model's own image processor settings (CLIP mean/std unless `preprocessor_config.json` says otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import Emu3VQVAE

from napari_mris.errors import ModelDirectoryError

# transformers' Emu3ImageProcessor defaults (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalisation(local_dir: Path) -> tuple[list[float], list[float]]:
    path = local_dir / "preprocessor_config.json"
    if not path.is_file():
        return list(CLIP_MEAN), list(CLIP_STD)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirectoryError(f"{path} is not valid JSON: {exc}") from exc

    def three(value: object, default: tuple[float, ...]) -> list[float]:
        if value is None:
            return list(default)
        return [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]

    return three(data.get("image_mean"), CLIP_MEAN), three(data.get("image_std"), CLIP_STD)


class Emu3ImageTokenizer(nn.Module):
    """(B, 1, S, S) in [0, 1] <-> (B, g*g) Emu3 codes, with g = S / the model's spatial factor."""

    def __init__(self, vqvae: Emu3VQVAE, image_size: int, mean: list[float], std: list[float]) -> None:
        super().__init__()
        factor = vqvae.vision_spatial_factor
        if image_size % factor:
            raise ValueError(f"image_size {image_size} must be a multiple of Emu3's spatial factor {factor}")
        self.vqvae = vqvae.eval()
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, local_dir: str | Path, image_size: int = 512) -> Emu3ImageTokenizer:
        """Load from a local folder only (no network): config.json + safetensors weights."""
        local_dir = Path(local_dir)
        if not (local_dir / "config.json").is_file():
            raise ModelDirectoryError(f"{local_dir} is not an Emu3 VQ model folder: config.json is missing")
        try:
            vqvae = Emu3VQVAE.from_pretrained(str(local_dir), local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelDirectoryError(f"{local_dir} could not be loaded as an Emu3 VQ model: {exc}") from exc
        mean, std = _normalisation(local_dir)
        return cls(vqvae, image_size, mean, std)

    @property
    def codebook_size(self) -> int:
        return int(self.vqvae.config.codebook_size)

    @property
    def grid(self) -> int:
        return self.image_size // self.vqvae.vision_spatial_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be (B, 1, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        pixels = (images.float().expand(-1, 3, -1, -1) - self.mean) / self.std
        sizes = torch.tensor([[self.image_size, self.image_size]] * images.shape[0])
        tokens = self.vqvae.encode(pixels, sizes).image_tokens
        return torch.stack(list(tokens)).flatten(1).long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        g = self.grid
        if codes.ndim != 2 or codes.shape[1] != g * g:
            raise ValueError(f"image codes must be (B, {g * g}), got {tuple(codes.shape)}")
        pixels = self.vqvae.decode(codes.long().view(-1, g, g))
        return (pixels * self.std + self.mean).mean(1, keepdim=True).clamp(0, 1)
