"""PNG / JPEG / TIFF images: pixel values as stored, no physical geometry (spacing 1, origin 0).

Colour is reduced to one gray channel because the model segments grayscale slices. The rule (`to_gray`):
an opaque alpha channel is dropped, three identical channels are taken as they are (an X-ray saved as RGB),
otherwise the BT.709 luma `0.2125 R + 0.7154 G + 0.0721 B` (scikit-image's `rgb2gray` weights) is kept in
the file's own value range. Transparent pixels or other channel counts are refused: there is no safe gray
image in them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.io
import tifffile

from napari_mris.errors import ImageReadError, UnsupportedImageError
from napari_mris.io.slice import Slice, file_slice, identity_geometry

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LUMA_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float64)


def read_raster(path: Path) -> Slice:
    """Read a PNG/JPEG/TIFF file; a multi-page grayscale TIFF becomes a (Z, H, W) stack."""
    path = Path(path)
    check_file_not_empty(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        array, channel_axis = _read_tiff(path)
    else:
        array, channel_axis = _read_png_jpeg(path)
    if 0 in array.shape:
        raise ImageReadError(f"{path}: the image has size 0 (shape {array.shape})")
    if channel_axis:
        array = to_gray(array, path)
    if array.ndim not in (2, 3):
        raise UnsupportedImageError(f"{path}: cannot use an image of shape {array.shape}; expected (H, W) or (Z, H, W)")
    return file_slice(array, path, identity_geometry(array.shape), path.stem)  # float TIFFs can hold NaN/inf


def check_file_not_empty(path: Path) -> None:
    """A 0-byte file is the most common broken download; say so instead of a decoder error."""
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: the file is empty (0 bytes)")


def to_gray(array: np.ndarray, path: Path) -> np.ndarray:
    """Reduce a channels-last (..., C) image to gray following the module's rule; see the module docstring."""
    channels = array.shape[-1]
    if channels not in (1, 3, 4):
        raise UnsupportedImageError(
            f"{path}: the image has {channels} channels; only gray, RGB, or RGBA with an opaque alpha can be read"
        )
    if channels == 4:
        alpha = array[..., 3]
        opaque = _max_value(array.dtype)
        not_opaque = int(np.count_nonzero(alpha != opaque))
        if not_opaque:
            raise UnsupportedImageError(
                f"{path}: the image has an alpha channel with {not_opaque} of {alpha.size} pixels not fully "
                "opaque, so it is not a plain gray/colour image; save it without transparency"
            )
        array = array[..., :3]
    if channels == 1:
        return array[..., 0]
    red, green, blue = array[..., 0], array[..., 1], array[..., 2]
    if np.array_equal(red, green) and np.array_equal(red, blue):
        return red
    return (array[..., :3].astype(np.float64) @ LUMA_WEIGHTS).astype(np.float32)


def _max_value(dtype: np.dtype) -> float:
    """Fully opaque alpha: the integer type's maximum, or 1.0 for float images."""
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def _read_png_jpeg(path: Path) -> tuple[np.ndarray, bool]:
    try:
        array = np.asarray(skimage.io.imread(path))
    except Exception as exc:  # imageio/Pillow raise many types for corrupt files
        raise ImageReadError(f"{path}: not a readable {path.suffix.lstrip('.').upper()} image ({exc})") from exc
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.ndim == 3:
        return array, True
    if array.ndim == 2:
        return array, False
    raise UnsupportedImageError(f"{path}: cannot use an image of shape {array.shape}")


def _read_tiff(path: Path) -> tuple[np.ndarray, bool]:
    """tifffile tells pages ('Z'/'I'/'Q') from colour samples ('S'), which the array shape alone cannot."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            array = np.asarray(series.asarray())
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error ...
        raise ImageReadError(f"{path}: not a readable TIFF image ({exc})") from exc
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    has_channels = "S" in axes
    if has_channels:  # planar-configured TIFFs put samples first; the gray rule wants them last
        array = np.moveaxis(array, axes.index("S"), -1)
    spatial = array.ndim - int(has_channels)
    if spatial not in (2, 3):
        raise UnsupportedImageError(f"{path}: cannot use a TIFF with axes {axes!r} and shape {array.shape}")
    return array, has_channels
