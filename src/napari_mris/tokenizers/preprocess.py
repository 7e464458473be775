"""From any 2D slice to the square [0, 1] picture the tokenizers see, and back to the slice's size.

The model is trained on 8-bit chest X-rays; a DICOM CT in Hounsfield units or a 16-bit radiograph must
reach it with comparable contrast. The slice's own VOI window (what a radiologist sees) is the best
guide; without one, the 0.5 / 99.5 percentiles ignore a few extreme pixels (burnt-in text, metal).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from napari_mris.errors import UnsupportedImageError


def _as_2d(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        raise UnsupportedImageError(
            f"expected a grayscale 2D slice, got a colour image of shape {pixels.shape}; convert it to gray first"
        )
    if pixels.ndim != 2:
        raise UnsupportedImageError(f"expected a 2D slice, got an array of shape {pixels.shape}")
    if pixels.size == 0 or min(pixels.shape) < 2:
        raise UnsupportedImageError(f"the slice is too small to segment: shape {pixels.shape}")
    if not (np.issubdtype(pixels.dtype, np.number) or pixels.dtype == bool) or np.iscomplexobj(pixels):
        raise UnsupportedImageError(f"expected real-valued pixels, got dtype {pixels.dtype}")
    return pixels.astype(np.float32)


def _resize(array: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area when shrinking (no aliasing), bilinear when enlarging (area would be nearest-neighbour)."""
    if tuple(array.shape[-2:]) == tuple(size):
        return array
    if array.shape[-2] >= size[0] and array.shape[-1] >= size[1]:
        return F.interpolate(array, size=size, mode="area")
    return F.interpolate(array, size=size, mode="bilinear", align_corners=False)


def to_model_image(pixels: np.ndarray, window: tuple[float, float] | None, size: int) -> np.ndarray:
    """Window, clip, scale to [0, 1] and resize to (size, size); returns float32."""
    image = _as_2d(pixels)
    finite = np.isfinite(image)
    if not finite.any():
        raise UnsupportedImageError("the slice has no finite pixel values")
    if window is not None:
        low, high = float(window[0]), float(window[1])
    else:
        low, high = (float(v) for v in np.percentile(image[finite], [0.5, 99.5]))
    if not high > low:  # constant image or degenerate window: use the full range, else a black picture
        low, high = float(image[finite].min()), float(image[finite].max())
    image = np.where(finite, image, low)
    scaled = np.clip((image - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(image)
    tensor = torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))[None, None]
    return _resize(tensor, (size, size))[0, 0].clamp(0, 1).numpy()


def resize_probability(prob: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray | torch.Tensor:
    """Bilinear resize of a probability map (..., h, w) to (..., H, W); same type out as in.

    Thresholding happens after resizing, so the mask edge is placed at sub-pixel precision.
    """
    is_numpy = isinstance(prob, np.ndarray)
    tensor = torch.from_numpy(np.asarray(prob, dtype=np.float32)) if is_numpy else prob.float()
    lead = tensor.shape[:-2]
    flat = tensor.reshape(-1, 1, *tensor.shape[-2:])
    if tuple(flat.shape[-2:]) != tuple(shape):
        flat = F.interpolate(flat, size=tuple(shape), mode="bilinear", align_corners=False)
    out = flat.reshape(*lead, *shape).clamp(0, 1)
    return out.numpy() if is_numpy else out
