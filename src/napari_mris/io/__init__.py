"""Medical image I/O: `read_slice()` for every supported input, label writers, atomic writes.

The file type is chosen by extension; a file without a known extension is read as DICOM when it carries
the 'DICM' marker (scanner exports are often named IM0001 etc.), and a folder is read as one DICOM series.
"""

from __future__ import annotations

from pathlib import Path

from napari_mris.errors import ImageReadError, UnsupportedImageError
from napari_mris.io.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from napari_mris.io.dicom import DICOM_SUFFIXES, folder_has_dicom, looks_like_dicom, read_dicom
from napari_mris.io.raster import RASTER_SUFFIXES, read_raster
from napari_mris.io.slice import Slice
from napari_mris.io.volume import VOLUME_SUFFIXES, has_volume_suffix, read_volume
from napari_mris.io.writers import write_dicom_seg, write_labels, write_nifti, write_png

SUPPORTED_SUFFIXES = DICOM_SUFFIXES + RASTER_SUFFIXES + VOLUME_SUFFIXES

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Slice",
    "atomic_path",
    "image_kind",
    "read_slice",
    "write_bytes_atomic",
    "write_dicom_seg",
    "write_labels",
    "write_nifti",
    "write_png",
    "write_text_atomic",
]


def image_kind(path: str | Path) -> str | None:
    """'dicom', 'raster' or 'volume' for a path read_slice can open, else None (no file content is decoded)."""
    path = Path(path)
    if path.is_dir():
        return "dicom" if folder_has_dicom(path) else None
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if has_volume_suffix(path):
        return "volume"
    if path.is_file() and looks_like_dicom(path):
        return "dicom"
    return None


def read_slice(path: str | Path, *, expect_2d: bool = False, series_uid: str | None = None) -> Slice:
    """Read a DICOM file/folder, PNG/JPEG/TIFF or NIfTI/NRRD/MHA into a `Slice`.

    expect_2d: refuse a stack (UnsupportedImageError) where the caller can only use one plane.
    series_uid: which series to read from a folder that holds several.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder")
    kind = "dicom" if path.is_dir() else image_kind(path)  # a folder: read_dicom says what it lacks
    if kind is None:
        raise UnsupportedImageError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; napari-mris reads DICOM "
            "(a file or a series folder), "
            f"{', '.join(RASTER_SUFFIXES)} and {', '.join(VOLUME_SUFFIXES)}"
        )
    if kind == "dicom":
        image = read_dicom(path, series_uid=series_uid)
    elif kind == "raster":
        image = read_raster(path)
    else:
        image = read_volume(path)
    if expect_2d and image.is_volume:
        raise UnsupportedImageError(
            f"{path}: this is a stack of {image.pixels.shape[0]} slices but a single 2D slice was expected; "
            "pick one slice (e.g. open it in napari) or save one plane"
        )
    return image
