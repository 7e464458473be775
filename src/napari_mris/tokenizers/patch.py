"""Patch-codebook mask tokenizer: every p x p patch of the mask is replaced by its nearest codebook patch.

Why not a learned VQ autoencoder (removed, docs/tokenizers.md): the language model has to *predict* mask
codes, and a convolutional VQ encoder sees each patch's neighbourhood, so the same empty patch gets
hundreds of different codes depending on what lies around it. On QaTa-COV19 the default 1,024-code VQ
tokenizer spreads the 95 % empty-or-full patches over 443 codes for 90 % of all tokens (measured), and a
decoder trained on those codes learned almost nothing in an hour. Here a patch's code depends on the
patch alone: all-empty is always code 0 and all-full always code 1, the other codes are k-means centres of
the boundary patches (fitted on the training masks), and decoding pastes the centres back.

Both decoding orders use the same class. `scales=(14,)` is the raster tokenizer; `scales=(1, 2, ...,
14)` is a pyramid for next-scale decoding: scale s encodes the mask resized to s*p pixels, so the codes
of any scale alone decode to that scale's coarse mask (a pyramid rather than VAR's residual sums; the
coarse previews the widget shows are then recognisable by construction).

Pasted centres are blocky: a centre is the mean of many border shapes, and a patch knows nothing of its
neighbours. An optional `BorderRefiner` (`refiner_channels` > 0) reads the pasted mosaic and corrects it
where neighbouring patches disagree; it is trained after the codebook with the codes frozen, so a decoder
LM trained on the codes stays valid (`napari-mris-train tokenizers --refine-decoders`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EMPTY, FULL = 0, 1  # the two codes every patch codebook starts with
KIND = "patch"


@dataclass(frozen=True)
class PatchMaskTokenizerConfig:
    image_size: int = 224
    scales: tuple[int, ...] = (14,)
    codebook_size: int = 512
    refiner_channels: int = 0  # 0 = paste the centres as they are; > 0 = a BorderRefiner this wide

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        if not self.scales or list(self.scales) != sorted(set(self.scales)) or self.scales[0] < 1:
            raise ValueError(f"scales must grow strictly from >= 1, got {self.scales}")
        if self.image_size % self.scales[-1]:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the grid {self.scales[-1]}")
        if self.codebook_size < 3:
            raise ValueError(
                f"codebook_size must be at least 3 (empty, full, one boundary patch), got {self.codebook_size}"
            )
        if self.refiner_channels < 0:
            raise ValueError(f"refiner_channels must be >= 0, got {self.refiner_channels}")
        if self.refiner_channels and self.patch % BorderRefiner.FACTOR:
            raise ValueError(f"a refiner needs patches that are a multiple of {BorderRefiner.FACTOR} px")

    @property
    def grid(self) -> int:
        return self.scales[-1]

    @property
    def patch(self) -> int:
        return self.image_size // self.grid

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self), "scales": list(self.scales)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchMaskTokenizerConfig:
        return cls(**{k: v for k, v in data.items() if k != "kind"})


class BorderRefiner(nn.Module):
    """A residual CNN on the pasted mosaic: logit(mosaic) + a correction, computed at 1/4 resolution.

    Dilations 1, 2, 4 give it a receptive field of about four patches, enough to see how a border runs
    on through the neighbours. The last layer starts at zero, so an untrained refiner changes nothing.
    """

    FACTOR = 4  # pixel-unshuffle factor: 224 px mosaics are refined on a 56 x 56 grid

    def __init__(self, channels: int) -> None:
        super().__init__()
        f2 = self.FACTOR**2
        self.body = nn.Sequential(
            nn.PixelUnshuffle(self.FACTOR),
            nn.Conv2d(f2, channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=4, dilation=4),
            nn.SiLU(),
            nn.Conv2d(channels, f2, 3, padding=1),
            nn.PixelShuffle(self.FACTOR),
        )
        nn.init.zeros_(self.body[-2].weight)
        nn.init.zeros_(self.body[-2].bias)

    def forward(self, mosaic: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) pasted probabilities -> refined logits of the same shape."""
        return torch.logit(mosaic.clamp(1e-3, 1 - 1e-3)) + self.body(mosaic * 2 - 1)


class PatchMaskTokenizer(nn.Module):
    """Binary mask (B, 1, H, W) <-> codes, one (B, s*s) LongTensor per scale; the codebook is a buffer."""

    def __init__(self, cfg: PatchMaskTokenizerConfig) -> None:
        super().__init__()
        self.config = cfg
        p = cfg.patch
        codebook = torch.full((cfg.codebook_size, p * p), 0.5)
        codebook[EMPTY], codebook[FULL] = 0.0, 1.0
        self.register_buffer("codebook", codebook)
        self.refiner = BorderRefiner(cfg.refiner_channels) if cfg.refiner_channels else None

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def scales(self) -> tuple[int, ...]:
        return self.config.scales

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def empty_code(self) -> int:
        """The code of an empty patch: fills the cells a raster preview has not reached yet."""
        return EMPTY

    def greedy_rule(self) -> ExpectedPatch:
        """How greedy decoding picks a code from the scores of the mask codes."""
        return ExpectedPatch(self.codebook)

    def next_scale_inputs(self, codes: torch.Tensor, size: int) -> torch.Tensor:
        """Codes [B, s*s] of one scale, nearest-upsampled to the next scale's [B, size*size] (the next-scale
        slots of coarse-to-fine decoding): a coarse patch code stands for every finer cell it covers."""
        return upsample_codes(codes, size)

    def patches(self, masks: torch.Tensor, scale: int) -> torch.Tensor:
        """(B, 1, H, W) masks -> (B, s*s, p*p) patches of the mask area-resized to s*p pixels."""
        if masks.ndim != 4 or masks.shape[1] != 1:
            raise ValueError(f"masks must be (B, 1, H, W), got {tuple(masks.shape)}")
        side = scale * self.config.patch
        resized = F.interpolate(masks.float(), size=(side, side), mode="area")
        return F.unfold(resized, kernel_size=self.config.patch, stride=self.config.patch).transpose(1, 2)

    def nearest(self, patches: torch.Tensor) -> torch.Tensor:
        """Index of the closest codebook patch (squared distance) for each row of (..., p*p).

        All-empty and all-full patches (most of a mask) are at distance 0 from codes 0 and 1 and from no
        fitted centre (those are means of border patches), so only the border patches are searched.
        """
        flat = patches.reshape(-1, patches.shape[-1])
        codes = torch.full((len(flat),), EMPTY, dtype=torch.long, device=flat.device)
        codes[(flat == 1).all(1)] = FULL
        border = torch.nonzero((flat != 0).any(1) & (flat != 1).any(1), as_tuple=True)[0]
        if len(border):
            codes[border] = _nearest(flat[border], self.codebook)
        return codes.view(patches.shape[:-1])

    @torch.no_grad()
    def encode(self, masks: torch.Tensor) -> list[torch.Tensor]:
        return [self.nearest(self.patches(masks, s)) for s in self.scales]

    def paste(self, codes: torch.Tensor, scale: int) -> torch.Tensor:
        """(B, s*s) codes of one scale -> (B, 1, s*p, s*p) mosaic of their codebook patches."""
        if codes.ndim != 2 or codes.shape[1] != scale * scale:
            raise ValueError(f"codes of scale {scale} must be (B, {scale * scale}), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"mask codes must lie in 0..{self.codebook_size - 1}")
        p = self.config.patch
        patches = self.codebook[codes.long()].transpose(1, 2)  # (B, p*p, s*s)
        return F.fold(patches, output_size=(scale * p, scale * p), kernel_size=p, stride=p)

    @torch.no_grad()
    def decode(self, codes: list[torch.Tensor], out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes of the first k scales -> (B, 1, S, S) probabilities from the k-th scale's patches."""
        if not 1 <= len(codes) <= len(self.scales):
            raise ValueError(f"expected 1..{len(self.scales)} scales of codes, got {len(codes)}")
        prob = self.paste(codes[-1], self.scales[len(codes) - 1])
        if self.refiner is not None:
            prob = torch.sigmoid(self.refiner(prob))
        size = tuple(out_size) if out_size is not None else (self.image_size, self.image_size)
        if prob.shape[-2:] != size:
            prob = F.interpolate(prob, size=size, mode="bilinear", align_corners=False)
        return prob.clamp(0, 1)


class ExpectedPatch:
    """Greedy choice for patch-codebook masks: the code closest to the probability-weighted mean patch.

    With hundreds of lesion-border codes, argmax picks "empty" wherever p(empty) is the largest single
    probability, even when most of the mass says "lesion" (spread over many similar border codes), so a
    greedily decoded mask comes out empty. Choosing the code nearest (L2) to the expected patch decides on
    the pixels instead: the minimum expected squared error choice among the codes.
    """

    def __init__(self, patches: torch.Tensor) -> None:
        self.patches = patches.float()  # (K, p*p), row k = the patch of mask code k
        self.half_norms = -0.5 * self.patches.pow(2).sum(1)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores [..., K] of the mask codes -> the chosen codes [...]."""
        if self.patches.device != scores.device:
            self.patches, self.half_norms = self.patches.to(scores.device), self.half_norms.to(scores.device)
        expected = scores.float().softmax(-1) @ self.patches
        # argmin |P_k - e|^2 = argmax (e . P_k - |P_k|^2 / 2), in one fused matmul; `max` finds the same
        # first index as `argmax`, a few times faster on a CPU
        closeness = torch.addmm(self.half_norms, expected.reshape(-1, expected.shape[-1]), self.patches.T)
        return closeness.max(-1).indices.reshape(expected.shape[:-1])


def upsample_codes(codes: torch.Tensor, size: int) -> torch.Tensor:
    """[B, s*s] codes of an s x s grid -> [B, size*size], each cell taking the code of the coarse cell it lies
    in (torch's 'nearest' index rule, floor(i * s / size))."""
    side = math.isqrt(codes.shape[-1])
    if codes.dim() != 2 or side * side != codes.shape[-1]:
        raise ValueError(f"codes must be [B, s*s] for a square grid, got {tuple(codes.shape)}")
    source = (torch.arange(size, device=codes.device) * side) // size
    return codes[:, (source[:, None] * side + source[None, :]).reshape(-1)]


def fit_codebook(
    tokenizer: PatchMaskTokenizer,
    masks: torch.Tensor,
    iterations: int = 25,
    max_masks: int = 3000,
    max_patches: int = 200_000,
    seed: int = 0,
) -> PatchMaskTokenizer:
    """k-means (k-means++ start) of the boundary patches of `masks` at every scale, into codes 2..K-1.

    Empty and full patches are excluded (they have their fixed codes 0 and 1), so every fitted code
    describes a lesion border, where reconstruction Dice is won or lost.
    """
    generator = torch.Generator().manual_seed(seed)
    if len(masks) > max_masks:
        masks = masks[torch.randperm(len(masks), generator=generator)[:max_masks]]
    pieces = [tokenizer.patches(masks, s).reshape(-1, tokenizer.config.patch**2) for s in tokenizer.scales]
    data = torch.cat(pieces)
    border = data[(data.amax(1) > 1e-3) & (data.amin(1) < 1 - 1e-3)]  # neither empty nor full
    if len(border) > max_patches:
        border = border[torch.randperm(len(border), generator=generator)[:max_patches]]
    k = tokenizer.codebook_size - 2
    if len(border) < k:
        raise ValueError(f"only {len(border)} boundary patches for {k} codes: use a smaller codebook_size")
    centres = _kmeans_plus_plus(border, k, generator)
    for _ in range(iterations):
        assign = _nearest(border, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, border)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed dead centres on the worst-served patches
            error = (border - centres[assign]).pow(2).sum(1)
            centres[empty] = border[error.topk(int(empty.sum())).indices]
    tokenizer.codebook[2:] = centres
    return tokenizer


def _nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
    norms = centres.pow(2).sum(1)[None]
    return torch.cat([(norms - 2 * x[i : i + chunk] @ centres.T).argmin(1) for i in range(0, len(x), chunk)])


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    centres = [x[torch.randint(len(x), (1,), generator=generator)][0]]
    distance = _squared_distance(x, centres[0])
    for _ in range(1, k):
        pick = torch.multinomial(distance + 1e-12, 1, generator=generator)[0]
        centres.append(x[pick])
        torch.minimum(distance, _squared_distance(x, x[pick]), out=distance)
    return torch.stack(centres)


def _squared_distance(x: torch.Tensor, centre: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """`(x - centre).pow(2).sum(1)`, the same numbers, in row chunks: the whole-array temporaries of 200,000
    patches (200 MB each) made each k-means++ pick memory-bound, which dominated fitting 4,096 codes."""
    return torch.cat([(x[i : i + chunk] - centre).pow(2).sum(1) for i in range(0, len(x), chunk)])
