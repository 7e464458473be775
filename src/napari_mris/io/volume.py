"""NIfTI / NRRD / MetaImage files through SimpleITK, with geometry converted to numpy array-axis order.

SimpleITK reports spacing/origin/direction in index order (x, y, z) and physical LPS coordinates (x, y, z);
`GetArrayFromImage` gives the array in (z, y, x). Reversing both the axes and the physical coordinates turns
ITK's `p = origin + D @ (spacing * index)` into the same formula in array order, which is what `Slice` holds.
A volume with a single slice is read as a 2D slice (many tools save one plane as an (X, Y, 1) NIfTI).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from napari_mris.errors import ImageReadError, UnsupportedImageError
from napari_mris.io.raster import check_file_not_empty, to_gray
from napari_mris.io.slice import Slice

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def has_volume_suffix(path: Path) -> bool:
    return Path(path).name.lower().endswith(VOLUME_SUFFIXES)


def volume_stem(path: Path) -> str:
    name = Path(path).name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def read_volume(path: Path) -> Slice:
    """Read a 2D or 3D NIfTI/NRRD/MHA image; intensities as stored (after the file's own scaling)."""
    path = Path(path)
    check_file_not_empty(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:  # SimpleITK reports every reader failure as RuntimeError
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise ImageReadError(f"{path}: not a readable NIfTI/NRRD/MetaImage file ({first_line})") from exc
    if image.GetDimension() not in (2, 3):
        raise UnsupportedImageError(
            f"{path}: {image.GetDimension()}D images are not supported; save a 2D slice or a 3D volume"
        )
    array = sitk.GetArrayFromImage(image)
    if 0 in array.shape:
        raise ImageReadError(f"{path}: the image has size 0 (shape {array.shape})")
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = to_gray(array, path)
    spacing, origin, direction = array_order_geometry(image)
    if array.ndim == 3 and array.shape[0] == 1:
        array, spacing, origin, direction = array[0], spacing[1:], origin[1:], direction[1:, 1:]
    return Slice(
        pixels=array.astype(np.float32),
        spacing=spacing,
        origin=origin,
        direction=direction,
        window=None,
        source_path=path,
        name=volume_stem(path),
    )


def array_order_geometry(image: sitk.Image) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """SimpleITK (x, y, z) geometry -> (spacing, origin, direction) in array order."""
    ndim = image.GetDimension()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    return tuple(image.GetSpacing()[::-1]), tuple(image.GetOrigin()[::-1]), direction[::-1, ::-1].copy()


def to_sitk_image(
    array: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...], direction: np.ndarray
) -> sitk.Image:
    """The inverse of `array_order_geometry`: an array plus array-order geometry -> a SimpleITK image."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing[::-1]])
    image.SetOrigin([float(o) for o in origin[::-1]])
    image.SetDirection(np.asarray(direction, dtype=np.float64)[::-1, ::-1].ravel().tolist())
    return image
