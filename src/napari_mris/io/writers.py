"""Label writers: PNG (a mask), NIfTI/NRRD/MHA (labels with geometry), DICOM SEG (labels bound to the source).

Every writer validates first (shape, values, what the format can hold) and then writes atomically, so a
failed export never leaves a partial file. `like` is the `Slice` the labels were drawn on.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import skimage.io

import napari_mris
from napari_mris.errors import ExportError
from napari_mris.io.atomic import atomic_path
from napari_mris.io.dicom import plane_geometry_3d
from napari_mris.io.slice import Slice, identity_geometry
from napari_mris.io.volume import to_sitk_image

PNG_SUFFIXES = (".png",)
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
DICOM_SUFFIXES = (".dcm",)
ALGORITHM_NAME = "napari-mris"
LO_MAX = 64  # DICOM "Long String" limit, e.g. SegmentLabel


def write_labels(
    path: str | Path,
    labels: np.ndarray,
    like: Slice | None = None,
    segment_labels: dict[int, str] | None = None,
) -> Path:
    """Write `labels` in the format named by the extension: .png, .nii/.nii.gz/.nrrd/.mha or .dcm (DICOM SEG).

    A PNG holds a 0/255 mask when at most one label value is present, else the label values themselves.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(PNG_SUFFIXES):
        values = _label_values(_as_label_array(labels, path))
        return write_png(path, labels, binary=len(values) <= 1)
    if name.endswith(NIFTI_SUFFIXES):
        return write_nifti(path, labels, like)
    if name.endswith(DICOM_SUFFIXES):
        if like is None:
            raise ExportError(f"{path}: a DICOM SEG needs the source DICOM image; open the image with napari-mris")
        return write_dicom_seg(path, labels, like, segment_labels or {})
    raise ExportError(
        f"{path}: unknown label file type; use one of {', '.join(PNG_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES)}"
    )


def write_png(path: str | Path, labels: np.ndarray, *, binary: bool = True) -> Path:
    """A 2D mask: 0/255 (binary=True: every non-zero label becomes 255), else label values as uint8/uint16."""
    path = Path(path)
    labels = _as_label_array(labels, path)
    if labels.ndim != 2:
        raise ExportError(f"{path}: a PNG holds one 2D plane, the labels have shape {labels.shape}; use NIfTI or SEG")
    if binary:
        out = np.where(labels > 0, 255, 0).astype(np.uint8)
    else:
        out = labels.astype(np.uint8 if labels.max(initial=0) <= 255 else np.uint16)
    with _atomic_target(path) as tmp:
        skimage.io.imsave(tmp, out, check_contrast=False)
    return path


def write_nifti(path: str | Path, labels: np.ndarray, like: Slice | None = None) -> Path:
    """Labels with the spacing/origin/direction of `like` (.nii, .nii.gz, .nrrd, .mha).

    A 2D label plane drawn on a positioned DICOM slice is written as a one-slice volume at the slice's place
    in the patient, so other viewers overlay it on the DICOM; reading it back gives the 2D plane again.
    """
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise ExportError(f"{path}: write_nifti writes {', '.join(NIFTI_SUFFIXES)} files")
    labels = _as_label_array(labels, path)
    _check_shape(labels, like, path)
    spacing, origin, direction = (
        identity_geometry(labels.shape) if like is None else (like.spacing, like.origin, like.direction)
    )
    if labels.ndim == 2 and like is not None and like.dicom:
        geometry3 = plane_geometry_3d(like.dicom[0], like.frame_numbers[0] if like.frame_numbers else None)
        if geometry3 is not None:
            labels, (spacing, origin, direction) = labels[None], geometry3
    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
    image = to_sitk_image(labels.astype(dtype), spacing, origin, direction)
    with _atomic_target(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=path.name.lower().endswith((".nii.gz", ".nrrd", ".mha")))
        except RuntimeError as exc:
            raise ExportError(f"{path}: SimpleITK could not write the labels ({exc})") from exc
    return path


def write_dicom_seg(
    path: str | Path,
    labels: np.ndarray,
    like: Slice,
    segment_labels: dict[int, str] | None = None,
    *,
    algorithm_type: str = "SEMIAUTOMATIC",
) -> Path:
    """A DICOM Segmentation (BINARY) referencing `like`'s source images, one segment per label value present.

    Label values are renumbered 1..N in increasing order (DICOM segment numbers must be consecutive); the
    segment label is the prompt (`segment_labels[value]`) cut to DICOM's 64 characters, the full prompt is
    kept in SegmentDescription. Frames follow the source slices plane by plane; empty planes are omitted.
    """
    import highdicom as hd  # imported here: it (and pydicom.sr) adds ~0.5 s to every start of the reader
    from pydicom.sr.codedict import codes

    path = Path(path)
    segment_labels = segment_labels or {}
    labels = _as_label_array(labels, path)
    if not like.dicom:
        raise ExportError(f"{path}: a DICOM SEG needs a DICOM source image; {like.name or 'this image'} is not DICOM")
    _check_shape(labels, like, path)
    values = _label_values(labels)
    if not values:
        raise ExportError(f"{path}: the labels are empty (all 0); a DICOM SEG needs at least one segment")
    if algorithm_type not in ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"):
        raise ExportError(f"{path}: algorithm type must be AUTOMATIC, SEMIAUTOMATIC or MANUAL, not {algorithm_type!r}")
    segments = np.zeros(labels.shape, dtype=np.uint8 if len(values) < 256 else np.uint16)
    for number, value in enumerate(values, start=1):
        segments[labels == value] = number
    source_images, pixel_array = _source_frames(segments, like)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=napari_mris.__version__
    )
    descriptions = []
    for number, value in enumerate(values, start=1):
        text = segment_labels.get(value, "") or f"label {value}"
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=_long_string(text) or f"label {value}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=algorithm_type,
            algorithm_identification=algorithm if algorithm_type != "MANUAL" else None,
        )
        description.SegmentDescription = text[:1024]  # (0062,0006) ST: the whole prompt
        descriptions.append(description)
    source = source_images[0]
    try:
        seg = hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=pixel_array,
            segmentation_type="BINARY",
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(source.get("SeriesNumber") or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=ALGORITHM_NAME,
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=napari_mris.__version__,
            device_serial_number="0",
            content_description=_long_string("; ".join(d.SegmentLabel for d in descriptions)),
            content_label="MRIS",
            specific_character_set="ISO_IR 192",  # UTF-8: prompts may hold any character
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ExportError(
            f"{path}: highdicom could not build a DICOM SEG from {like.name or 'the source'} ({exc})"
        ) from exc
    seg.SeriesDescription = "napari-mris segmentation"
    with _atomic_target(path) as tmp:
        seg.save_as(tmp)
    return path


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """`atomic_path`, with file-system failures (no space, no permission, bad folder) as ExportError."""
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as exc:
        raise ExportError(f"{path}: the file could not be written ({exc.strerror or exc})") from exc


def _source_frames(segments: np.ndarray, like: Slice) -> tuple[list, np.ndarray]:
    """The source datasets and a pixel array whose frame i belongs to source image/frame i (highdicom's rule)."""
    if like.frame_numbers:  # planes of one multi-frame dataset: place them at their frame numbers
        source = like.dicom[0]
        planes = segments if segments.ndim == 3 else segments[None]
        full = np.zeros((int(source.NumberOfFrames), *planes.shape[1:]), dtype=segments.dtype)
        for plane, frame_number in zip(planes, like.frame_numbers, strict=True):
            full[frame_number - 1] = plane
        return [source], full
    return list(like.dicom), segments


def _as_label_array(labels: np.ndarray, path: Path) -> np.ndarray:
    """Non-negative integer labels (bool and integral floats accepted), as int64."""
    array = np.asarray(labels)
    if array.dtype == np.bool_:
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ExportError(f"{path}: labels must be whole numbers; got non-integer values")
    elif not np.issubdtype(array.dtype, np.integer):
        raise ExportError(f"{path}: labels must be an integer array, not {array.dtype}")
    if array.ndim not in (2, 3) or 0 in array.shape:
        raise ExportError(f"{path}: labels must be a non-empty 2D or 3D array, got shape {array.shape}")
    array = array.astype(np.int64)
    if array.min() < 0 or array.max() > 65535:
        raise ExportError(f"{path}: label values must lie in 0..65535, got {array.min()}..{array.max()}")
    return array


def _label_values(labels: np.ndarray) -> list[int]:
    return [int(v) for v in np.unique(labels) if v != 0]


def _check_shape(labels: np.ndarray, like: Slice | None, path: Path) -> None:
    if like is not None and labels.shape != like.shape:
        raise ExportError(
            f"{path}: the labels have shape {labels.shape} but the image {like.name or ''} has shape {like.shape}"
        )


def _long_string(text: str) -> str:
    """A DICOM LO value: no backslash or control characters, single spaces, at most 64 characters."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text.replace("\\", "/"))
    return re.sub(r"\s+", " ", text).strip()[:LO_MAX].strip()
