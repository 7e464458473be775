"""DICOM images (CT, MR, CR/DX X-ray; single- and multi-frame; a folder holding one series).

Intensities follow the DICOM display pipeline up to (not including) the VOI LUT: the modality LUT
(RescaleSlope/Intercept, so CT is in HU) is applied to the pixels, the VOI window is kept as
`Slice.window`, and MONOCHROME1 images are inverted so that bright always means dense. Geometry comes
from ImagePositionPatient/ImageOrientationPatient and PixelSpacing (ImagerPixelSpacing for projection
X-ray), per frame for enhanced multi-frame files (functional groups). Stacks are sorted along the slice
normal, the same order ITK/SimpleITK use, so a NIfTI/NRRD label map of the series lines up plane by plane.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.uid import SegmentationStorage

from napari_mris.errors import ImageReadError, UnsupportedImageError
from napari_mris.io.raster import check_file_not_empty, to_gray
from napari_mris.io.slice import Slice, check_finite

DICOM_SUFFIXES = (".dcm", ".dicom")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class FrameMeta:
    """What one frame of a dataset says about its geometry and intensities (None = not in the file)."""

    position: np.ndarray | None  # ImagePositionPatient (x, y, z), mm
    orientation: np.ndarray | None  # ImageOrientationPatient: row cosine (3) then column cosine (3)
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), mm
    slice_spacing: float | None  # SpacingBetweenSlices, else SliceThickness
    transform: Dataset  # the item holding RescaleSlope/Intercept or a ModalityLUTSequence
    voi: Dataset  # the item holding WindowCenter/WindowWidth


@dataclass
class Plane:
    """One decoded 2D plane with where it came from."""

    pixels: np.ndarray  # (H, W) float32: modality LUT applied, MONOCHROME1 inverted
    window: tuple[float, float] | None
    meta: FrameMeta
    dataset: Dataset
    frame_number: int | None  # 1-based, for multi-frame datasets
    label: str  # "file" or "file frame n", for messages


# ----------------------------------------------------------------------------- entry points


def read_dicom(path: Path, series_uid: str | None = None) -> Slice:
    """Read a DICOM file (one plane or a multi-frame stack) or a folder holding one series."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid)
    ds = load_dataset(path)
    check_is_image(ds, path)
    return assemble(dataset_planes(ds, path), source_path=path, name=path.stem)


def read_dicom_series(folder: Path, series_uid: str | None = None) -> Slice:
    """Read the DICOM image series in `folder` (not its subfolders) as a stack sorted along the slice normal.

    Files that are not DICOM images (other files, segmentations, reports, DICOMDIR) are ignored, so a
    folder holding a series plus its DICOM SEG opens as the series.
    """
    folder = Path(folder)
    series = _image_files_by_series(folder)
    if not series:
        raise ImageReadError(f"{folder}: the folder holds no DICOM image files")
    if series_uid is not None:
        if series_uid not in series:
            raise ImageReadError(
                f"{folder}: no DICOM series with SeriesInstanceUID {series_uid}; the folder holds "
                f"{_describe_series(series)}"
            )
        files = series[series_uid]
    elif len(series) > 1:
        raise UnsupportedImageError(
            f"{folder}: the folder holds {len(series)} DICOM image series: {_describe_series(series)}. "
            "Open a single file, move one series into a folder of its own, or pick one with "
            "read_slice(folder, series_uid=...)"
        )
    else:
        files = next(iter(series.values()))
    planes = []
    for file in files:
        ds = load_dataset(file)
        check_is_image(ds, file)
        planes.extend(dataset_planes(ds, file))
    return assemble(planes, source_path=folder, name=folder.name)


def looks_like_dicom(path: Path) -> bool:
    """True for a `.dcm`/`.dicom` name or a file with the 'DICM' marker at byte 128 (names like IM0001)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def folder_has_dicom(folder: Path, max_files: int = 64) -> bool:
    """Cheap check (first `max_files` files) used by the napari reader to claim a folder."""
    for count, file in enumerate(sorted(Path(folder).iterdir())):
        if count >= max_files:
            break
        if file.is_file() and looks_like_dicom(file):
            return True
    return False


# ----------------------------------------------------------------------------- loading and checks


def load_dataset(path: Path, stop_before_pixels: bool = False) -> Dataset:
    """`pydicom.dcmread` with its failures turned into messages that name the file."""
    check_file_not_empty(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise ImageReadError(f"{path}: not a DICOM file (no 'DICM' marker at byte 128)") from exc
    except Exception as exc:  # pydicom raises EOFError, struct.error, ValueError ... on broken files
        raise ImageReadError(f"{path}: truncated or corrupt DICOM file ({type(exc).__name__}: {exc})") from exc


def check_is_image(ds: Dataset, path: Path) -> None:
    if ds.get("SOPClassUID") == SegmentationStorage or ds.get("Modality") == "SEG":
        raise UnsupportedImageError(
            f"{path}: this is a DICOM Segmentation (SEG), not an image; open the image it segments"
        )
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        kind = f" ({sop.name})" if sop is not None else ""
        # pydicom stops quietly at the end of a cut-off file: an image header without pixels was cut
        if len(ds) == 0 or "Rows" in ds or (sop is not None and "Image Storage" in sop.name):
            raise ImageReadError(f"{path}: the DICOM file{kind} ends before its pixel data; the file is truncated")
        raise ImageReadError(f"{path}: the DICOM file{kind} holds no pixel data, so it is not an image")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        raise UnsupportedImageError(f"{path}: PALETTE COLOR DICOM images are not supported; export it as grayscale")


def _is_image_header(ds: Dataset) -> bool:
    """Image IODs carry Rows/Columns; a SEG does too but is not an image to segment."""
    is_seg = ds.get("SOPClassUID") == SegmentationStorage or ds.get("Modality") == "SEG"
    return "Rows" in ds and "Columns" in ds and not is_seg


def _image_files_by_series(folder: Path) -> dict[str, list[Path]]:
    series: dict[str, list[Path]] = defaultdict(list)
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.name.upper() == "DICOMDIR" or file.stat().st_size == 0:
            continue
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM at all (README, LICENSE, ...)
        except Exception as exc:
            raise ImageReadError(f"{file}: truncated or corrupt DICOM file ({type(exc).__name__}: {exc})") from exc
        if _is_image_header(header):
            series[str(header.get("SeriesInstanceUID", ""))].append(file)
    return dict(series)


def _describe_series(series: dict[str, list[Path]]) -> str:
    parts = []
    for uid, files in series.items():
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        what = ", ".join(
            str(v) for v in (header.get("Modality"), header.get("SeriesNumber"), header.get("SeriesDescription")) if v
        )
        parts.append(f"series_uid={uid or '(none)'} ({what}; {len(files)} files, e.g. {files[0].name})")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- decoding


def dataset_planes(ds: Dataset, path: Path) -> list[Plane]:
    """Decode every frame of `ds` into a `Plane` (pixels in physical units, window, geometry)."""
    try:
        array = ds.pixel_array
    except Exception as exc:  # decoders raise ValueError/RuntimeError/NotImplementedError ...
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        syntax_name = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        raise ImageReadError(
            f"{path}: the pixel data could not be decoded{syntax_name}; the file is truncated, corrupt or uses a "
            f"compression no installed decoder reads ({exc})"
        ) from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    is_color = int(ds.get("SamplesPerPixel", 1)) > 1
    if n_frames == 1:
        array = array[None]
    if array.shape[0] != n_frames or 0 in array.shape:
        raise ImageReadError(f"{path}: pixel data of shape {array.shape} does not hold {n_frames} frame(s)")
    monochrome1 = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    planes = []
    for index in range(n_frames):
        meta = frame_meta(ds, index, n_frames)
        if is_color:
            pixels, window = to_gray(array[index], path).astype(np.float32), None
        else:
            pixels = np.asarray(apply_modality_lut(array[index], meta.transform), dtype=np.float32)
            window = voi_window(meta.voi)
            if monochrome1:
                pixels, window = _invert(pixels, window, ds, meta.transform)
        frame_number = index + 1 if n_frames > 1 else None
        # float pixel data can hold NaN/inf, and a huge rescale slope overflows float32
        check_finite(pixels, path, f" (frame {frame_number})" if frame_number else "")
        label = f"{path.name} frame {frame_number}" if frame_number else path.name
        planes.append(Plane(pixels, window, meta, ds, frame_number, label))
    for keyword in PIXEL_KEYWORDS:  # decoded above; the header is all an export needs
        if keyword in ds:
            delattr(ds, keyword)
    return planes


def frame_meta(ds: Dataset, index: int, n_frames: int) -> FrameMeta:
    """Geometry and intensity items for frame `index`: per-frame functional groups, then shared, then top level."""
    groups = []
    if "PerFrameFunctionalGroupsSequence" in ds and index < len(ds.PerFrameFunctionalGroupsSequence):
        groups.append(ds.PerFrameFunctionalGroupsSequence[index])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])

    def item(sequence: str) -> Dataset | None:
        for group in groups:
            if sequence in group and len(group[sequence].value):
                return group[sequence].value[0]
        return None

    position_item = item("PlanePositionSequence") or ds
    orientation_item = item("PlaneOrientationSequence") or ds
    measures = item("PixelMeasuresSequence") or ds
    position = _floats(position_item.get("ImagePositionPatient"), 3)
    orientation = _floats(orientation_item.get("ImageOrientationPatient"), 6)
    spacing = _floats(measures.get("PixelSpacing") or ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    slice_spacing = measures.get("SpacingBetweenSlices") or measures.get("SliceThickness")
    slice_spacing = float(slice_spacing) if slice_spacing else None
    if n_frames > 1 and not groups and position is not None and orientation is not None:
        # Legacy multi-frame: one position for frame 1; the others follow along the normal (as ITK does).
        normal = np.cross(orientation[:3], orientation[3:])
        position = position + normal * (slice_spacing or 1.0) * index
    return FrameMeta(
        position=position,
        orientation=orientation,
        pixel_spacing=tuple(spacing) if spacing is not None else None,
        slice_spacing=slice_spacing,
        transform=item("PixelValueTransformationSequence") or ds,
        voi=item("FrameVOILUTSequence") or ds,
    )


def voi_window(item: Dataset) -> tuple[float, float] | None:
    """(low, high) of the first VOI window, by the DICOM formulas (PS3.3 C.11.2.1.2); None if absent/invalid."""
    center, width = _first(item.get("WindowCenter")), _first(item.get("WindowWidth"))
    if center is None or width is None:
        return None
    if str(item.get("VOILUTFunction", "LINEAR")).upper() == "LINEAR":
        if width < 1:
            return None
        return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    if width <= 0:
        return None
    return center - width / 2, center + width / 2  # LINEAR_EXACT (SIGMOID: its central slope region)


def _invert(
    pixels: np.ndarray, window: tuple[float, float] | None, ds: Dataset, transform: Dataset
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """MONOCHROME1 -> MONOCHROME2: reflect values within the full modality-LUT output range, window with them."""
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        low, high = float(pixels.min()), float(pixels.max())
    else:
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        stored = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1] if signed else [0, (1 << bits) - 1])
        low, high = (float(v) for v in apply_modality_lut(stored, transform))
    total = low + high
    inverted = (total - pixels).astype(np.float32)
    return inverted, (total - window[1], total - window[0]) if window is not None else None


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return float(value[0]) if len(value) else None
    return float(value)


def _floats(value, count: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array if array.shape == (count,) else None


# ----------------------------------------------------------------------------- geometry


def assemble(planes: list[Plane], source_path: Path, name: str) -> Slice:
    """Build a 2D `Slice` from one plane or a (Z, H, W) stack from several, sorted along the slice normal."""
    shapes = {plane.pixels.shape for plane in planes}
    if len(shapes) > 1:
        raise UnsupportedImageError(f"{source_path}: the slices have different sizes {sorted(shapes)}; not one stack")
    spacings = {plane.meta.pixel_spacing for plane in planes}
    if len(spacings) > 1:
        raise UnsupportedImageError(
            f"{source_path}: the slices have different pixel spacings {sorted(spacings, key=str)}; not one stack"
        )
    orientation = _common_orientation(planes, source_path)
    planes, slice_spacing = _sort_planes(planes, orientation, source_path)
    first = planes[0]
    row_spacing, col_spacing = first.meta.pixel_spacing or (1.0, 1.0)
    spacing3 = (slice_spacing, row_spacing, col_spacing)
    origin3, direction3 = _array_order_geometry(first.meta.position, orientation)
    datasets = [plane.dataset for plane in planes]
    single_multiframe = all(p.frame_number is not None for p in planes) and all(d is datasets[0] for d in datasets)
    frame_numbers = tuple(p.frame_number for p in planes) if single_multiframe else ()
    if len(planes) == 1:
        return Slice(
            pixels=first.pixels,
            spacing=spacing3[1:],
            origin=tuple(origin3[1:]),
            direction=direction3[1:, 1:],
            window=first.window,
            source_path=source_path,
            dicom=datasets,
            name=name,
            frame_numbers=frame_numbers,
        )
    return Slice(
        pixels=np.stack([plane.pixels for plane in planes]),
        spacing=spacing3,
        origin=tuple(origin3),
        direction=direction3,
        window=first.window,
        source_path=source_path,
        dicom=datasets,
        name=name,
        frame_numbers=frame_numbers,
    )


def plane_geometry_3d(ds: Dataset, frame_number: int | None = None) -> tuple[tuple, tuple, np.ndarray] | None:
    """(spacing, origin, direction) in array order (z, y, x) of one plane as a one-slice volume, if positioned.

    Writers use it to keep a 2D DICOM slice's true place in the patient when they export a NIfTI/NRRD.
    """
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    meta = frame_meta(ds, (frame_number or 1) - 1, n_frames)
    if meta.position is None or meta.orientation is None:
        return None
    row_spacing, col_spacing = meta.pixel_spacing or (1.0, 1.0)
    origin3, direction3 = _array_order_geometry(meta.position, meta.orientation)
    return (meta.slice_spacing or 1.0, row_spacing, col_spacing), tuple(origin3), direction3


def _common_orientation(planes: list[Plane], source_path: Path) -> np.ndarray | None:
    orientations = [plane.meta.orientation for plane in planes]
    if any(o is None for o in orientations):
        return None
    reference = orientations[0]
    for plane, orientation in zip(planes, orientations, strict=True):
        if not np.allclose(orientation, reference, atol=1e-4):
            raise UnsupportedImageError(
                f"{source_path}: {plane.label} is oriented differently from {planes[0].label}; not one stack"
            )
    return reference


def _sort_planes(planes: list[Plane], orientation: np.ndarray | None, source_path: Path) -> tuple[list[Plane], float]:
    """Sort by position along the normal (else InstanceNumber/frame); return planes and the slice spacing."""
    if len(planes) == 1:
        return planes, planes[0].meta.slice_spacing or 1.0
    if orientation is None or any(plane.meta.position is None for plane in planes):
        planes = sorted(planes, key=lambda p: (int(p.dataset.get("InstanceNumber", 0) or 0), p.frame_number or 0))
        return planes, planes[0].meta.slice_spacing or 1.0
    normal = np.cross(orientation[:3], orientation[3:])
    keyed = sorted(((float(np.dot(p.meta.position, normal)), i, p) for i, p in enumerate(planes)), key=lambda t: t[:2])
    distances = np.diff([key for key, _, _ in keyed])
    for gap, (_, _, before), (_, _, after) in zip(distances, keyed, keyed[1:], strict=False):
        if gap < 1e-3:
            raise UnsupportedImageError(
                f"{source_path}: {before.label} and {after.label} lie at the same position; the folder mixes "
                "acquisitions - open one file or put each acquisition in its own folder"
            )
    spacing = round(float(np.median(distances)), 9)  # positions are decimal strings: drop float noise
    if float(np.ptp(distances)) > 0.01 * spacing:
        warnings.warn(
            f"{source_path}: slice gaps vary from {distances.min():.3f} to {distances.max():.3f} mm; "
            f"the stack is shown with the median spacing {spacing:.3f} mm",
            stacklevel=3,
        )
    return [p for _, _, p in keyed], spacing


def _array_order_geometry(position: np.ndarray | None, orientation: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Origin (z, y, x) and direction whose columns are the physical directions of array axes (slice, row, col).

    Array axis 1 (row index) moves along the column cosine, axis 2 (column index) along the row cosine,
    axis 0 along their cross product; every vector is written in (z, y, x) order like the array.
    """
    origin = position[::-1].copy() if position is not None else np.zeros(3)
    if orientation is None:
        return origin, np.eye(3)
    row_cosine, col_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, col_cosine)
    direction = np.stack([normal[::-1], col_cosine[::-1], row_cosine[::-1]], axis=1)
    return origin, direction
