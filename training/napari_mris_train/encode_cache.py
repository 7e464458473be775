"""Encode a training split once with the trained tokenizers and cache it, so epochs cost only the decoder.

For every example the cache holds the image codes and the full mask's codes of each order, both as stored
and flipped left-right (the flip augmentation), the mask at model resolution (zone prompts and overlap
checks need it), the model image as uint8 (for a decoder with a pixel stem) and the description's text
ids. It is one safetensors file in the model directory's
`cache/`, named by a fingerprint of the tokenizer files and the split's pairs, so a changed tokenizer or
dataset never reuses a stale cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from napari_mris.model.modeldir import file_sha256, save_weights
from napari_mris.tokenizers.preprocess import to_model_image

CACHE_VERSION = 2  # 2: the model images are stored too (the decoder's pixel stem reads them)
TOKENIZER_FILES = ("image_tokenizer.safetensors", "mask_tokenizer.safetensors", "tokenizer.json", "config.json")


@dataclass
class EncodedSplit:
    names: list[str]
    descriptions: list[str]
    image_codes: Tensor  # (N, 2, g*g): [:, 0] as stored, [:, 1] flipped left-right
    masks: Tensor  # (N, S, S) bool at model resolution, as stored
    images: Tensor  # (N, S, S) uint8 model image (0..255 for 0..1), as stored
    mask_codes: dict[str, list[Tensor]]  # order -> one (N, 2, s*s) per scale, [:, 1] flipped
    text_ids: list[list[int]]  # the description's text ids (as stored; flipped texts are encoded on use)

    def __len__(self) -> int:
        return len(self.names)


def model_image(image: np.ndarray, size: int) -> Tensor:
    """(1, size, size) float in [0, 1], exactly as the pipeline preprocesses a slice without a window."""
    return torch.from_numpy(np.ascontiguousarray(to_model_image(image, None, size)))[None]


def model_mask(mask: np.ndarray, size: int) -> Tensor:
    """(1, size, size) float {0, 1}: area-resized and cut at 0.5, so masks and images share one grid."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if m.shape[-2:] != (size, size):
        m = F.interpolate(m, size=(size, size), mode="area")
    return (m[0] >= 0.5).float()


@torch.no_grad()
def encode_masks(tokenizers, masks: Tensor) -> dict[str, list[Tensor]]:
    """Masks (B, 1, S, S) -> codes per order and scale, each (B, s*s)."""
    return {order: [c.long() for c in tok.encode(masks)] for order, tok in tokenizers.masks.items()}


@torch.no_grad()
def encode_split(split, tokenizers, image_size: int, batch_size: int = 32, progress: bool = True) -> EncodedSplit:
    """Run the tokenizers over every example of an `LViTSplit` (both flips)."""
    images, masks, names, descriptions = [], [], [], []
    for index in tqdm(range(len(split)), desc="reading", disable=not progress, leave=False):
        example = split[index]
        images.append(model_image(example.image, image_size))
        masks.append(model_mask(example.mask, image_size))
        names.append(example.name)
        descriptions.append(example.description)
    images_t, masks_t = torch.stack(images), torch.stack(masks)
    image_codes, mask_codes = [], {order: [] for order in tokenizers.masks}
    for start in tqdm(range(0, len(names), batch_size), desc="encoding", disable=not progress, leave=False):
        img = images_t[start : start + batch_size]
        msk = masks_t[start : start + batch_size]
        image_codes.append(torch.stack([tokenizers.image.encode(x).long() for x in (img, img.flip(-1))], 1))
        plain, flipped = encode_masks(tokenizers, msk), encode_masks(tokenizers, msk.flip(-1))
        for order in mask_codes:
            mask_codes[order].append([torch.stack(pair, 1) for pair in zip(plain[order], flipped[order], strict=True)])
    return EncodedSplit(
        names=names,
        descriptions=descriptions,
        image_codes=torch.cat(image_codes),
        masks=masks_t[:, 0].bool(),
        images=(images_t[:, 0] * 255).round().to(torch.uint8),
        mask_codes={o: [torch.cat(s) for s in zip(*chunks, strict=True)] for o, chunks in mask_codes.items()},
        text_ids=[list(tokenizers.text.encode(d, truncate=True)) for d in descriptions],
    )


def fingerprint(model_dir: Path, split, image_size: int) -> str:
    """Tokenizer files + the split's pairs (paths, sizes, modification times, descriptions) + image size.

    File stats rather than contents keep this instant for thousands of images while still noticing a
    mask that was corrected in place.
    """
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{image_size}".encode())
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file() and name != "config.json":
            digest.update(file_sha256(path).encode())
    for name, image_path, mask_path, description in split.pairs:
        stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (Path(image_path), Path(mask_path))]
        digest.update(f"{name}|{image_path}|{mask_path}|{stats}|{description}".encode())
    return digest.hexdigest()[:16]


def save_encoded(path: Path, data: EncodedSplit) -> None:
    flat = torch.tensor([t for ids in data.text_ids for t in ids], dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids in data.text_ids], dtype=torch.long)
    packed = torch.from_numpy(np.packbits(data.masks.numpy(), axis=-1))  # 8x smaller: 36 MB for QaTa, not 290
    tensors = {
        "image_codes": data.image_codes,
        "images": data.images,
        "masks": packed,
        "text": flat,
        "lengths": lengths,
    }
    for order, scales in data.mask_codes.items():
        for k, codes in enumerate(scales):
            tensors[f"mask.{order}.{k}"] = codes
    meta = {
        "names": json.dumps(data.names),
        "descriptions": json.dumps(data.descriptions),
        "mask_size": str(data.masks.shape[-1]),
    }
    save_weights(path, tensors, metadata=meta)


def load_encoded(path: Path) -> EncodedSplit:
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    ends = torch.cumsum(tensors["lengths"], 0).tolist()
    starts = [0, *ends[:-1]]
    text = tensors["text"].tolist()
    mask_codes: dict[str, list[Tensor]] = {}
    keys = sorted((k.split(".") for k in tensors if k.startswith("mask.")), key=lambda p: (p[1], int(p[2])))
    for _, order, k in keys:
        mask_codes.setdefault(order, []).append(tensors[f"mask.{order}.{k}"])
    return EncodedSplit(
        names=json.loads(meta["names"]),
        descriptions=json.loads(meta["descriptions"]),
        image_codes=tensors["image_codes"],
        masks=torch.from_numpy(np.unpackbits(tensors["masks"].numpy(), axis=-1, count=int(meta["mask_size"]))).bool(),
        images=tensors["images"],
        mask_codes=mask_codes,
        text_ids=[text[a:b] for a, b in zip(starts, ends, strict=True)],
    )


def cached_encoding(model_dir: Path, split, tokenizers, image_size: int, progress: bool = True) -> EncodedSplit:
    """Load the cache for this split and these tokenizers, or encode and write it."""
    path = Path(model_dir) / "cache" / f"encoded_{fingerprint(Path(model_dir), split, image_size)}.safetensors"
    if path.is_file():
        try:
            return load_encoded(path)
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError):
            path.unlink()  # a damaged cache is rebuilt, never trusted
    data = encode_split(split, tokenizers, image_size, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_encoded(path, data)
    return data
