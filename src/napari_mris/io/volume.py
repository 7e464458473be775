"""NIfTI / NRRD / MetaImage files through SimpleITK, with geometry converted to numpy array-axis order.

SimpleITK reports spacing/origin/direction in index order (x, y, z) and physical LPS coordinates (x, y, z);
`GetArrayFromImage` gives the array in (z, y, x). Reversing both the axes and the physical coordinates turns
ITK's `p = origin + D @ (spacing * index)` into the same formula in array order, which is what `Slice` holds.
A volume with a single slice is read as a 2D slice (many tools save one plane as an (X, Y, 1) NIfTI).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from napari_mris.errors import ImageReadError, UnsupportedImageError
from napari_mris.io.raster import check_file_not_empty, to_gray
from napari_mris.io.slice import Slice, check_finite, file_slice

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
    image_slice = file_slice(array, path, (spacing, origin, direction), volume_stem(path))
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_voxels_finite(path)
    return image_slice


# NIfTI datatype code -> numpy type of one stored float component (complex types are pairs of floats)
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "f4", 1792: "f8"}


def _check_nifti_voxels_finite(path: Path) -> None:
    """Refuse a NIfTI file whose stored voxels hold NaN/inf.

    ITK's NIfTI reader (SimpleITK 2.x, ITK 5) replaces every non-finite voxel with 0 without a word (fixed
    only in ITK 6, InsightSoftwareConsortium/ITK#6683), so the pixels SimpleITK returns cannot show them:
    the stored voxels are read here from the file itself. Integer datatypes cannot hold NaN and are skipped.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(540)
            layout = _nifti_layout(header)
            if layout is None:
                return
            endian, datatype, count, offset = layout
            handle.seek(offset)
            item = np.dtype(endian + _NIFTI_FLOAT_TYPES[datatype])
            data = np.frombuffer(handle.read(count * item.itemsize), dtype=item)
    except (OSError, EOFError, struct.error) as exc:
        raise ImageReadError(f"{path}: not a readable NIfTI file ({exc})") from exc
    check_finite(data, path)


def _nifti_layout(header: bytes) -> tuple[str, int, int, int] | None:
    """(byte order, datatype, stored float components, data offset) of a float NIfTI-1/2 header, else None."""
    for endian in ("<", ">"):
        (size,) = struct.unpack(endian + "i", header[:4])
        if size == 348:  # NIfTI-1: dim int16[8] at 40, datatype at 70, vox_offset float32 at 108
            dims = struct.unpack(endian + "8h", header[40:56])
            (datatype,) = struct.unpack(endian + "h", header[70:72])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if size == 540:  # NIfTI-2: datatype int16 at 12, dim int64[8] at 16, vox_offset int64 at 168
            (datatype,) = struct.unpack(endian + "h", header[12:14])
            dims = struct.unpack(endian + "8q", header[16:80])
            (offset,) = struct.unpack(endian + "q", header[168:176])
            break
    else:
        return None  # not a NIfTI header SimpleITK read; nothing more to check
    if datatype not in _NIFTI_FLOAT_TYPES:
        return None
    count = int(np.prod([max(1, int(d)) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]]))
    components = 2 if datatype in (32, 1792) else 1
    return endian, datatype, count * components, max(offset, 352 if size == 348 else 544)


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
