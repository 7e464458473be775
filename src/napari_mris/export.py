"""Export of a segmentation: the label image (PNG, NIfTI/NRRD/MHA, DICOM SEG) plus a JSON sidecar.

The sidecar is what makes an exported mask auditable later: which prompt produced which label value, with
which model (id and weights hash), decoding settings and timings, by which software version, and when,
plus the SHA-256 of the label file it describes.

Why one sidecar per file, named after the whole file name (`mask.nii.gz` -> `mask.nii.gz.mris.json`):
exporting the same labels as PNG, NIfTI, NRRD and DICOM SEG gives four records that cannot overwrite each
other; each record travels with its file when the file is copied; and each is written on its own with an
atomic rename, so no shared manifest has to be read, merged and rewritten (nothing to lose in a crash or
between two exports at once). Both files are written atomically; the sidecar after the label file, so a
sidecar never describes a missing file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from napari_mris import __version__
from napari_mris.errors import ExportError
from napari_mris.io.atomic import write_text_atomic

FORMATS = {
    ".png": "PNG",
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".nrrd": "NRRD",
    ".mha": "MetaImage",
    ".dcm": "DICOM SEG",
}
SIDECAR_SUFFIX = ".mris.json"


def export_format(path: str | Path) -> str:
    """The format named by the file's extension, or an ExportError listing the accepted ones."""
    name = Path(path).name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    accepted = ", ".join(FORMATS)
    raise ExportError(f"Cannot export to {Path(path).name}: use one of the extensions {accepted}")


def sidecar_path(path: str | Path) -> Path:
    """`mask.nii.gz` -> `mask.nii.gz.mris.json`: the whole file name, so no two exported files share one."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def software_versions() -> dict[str, str]:
    """Versions that decide a result (read from package metadata, so nothing heavy is imported)."""
    versions = {"napari-mris": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "napari", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def build_sidecar(
    labels: np.ndarray,
    segments: Mapping[int, Mapping[str, Any]],
    *,
    label_file: str,
    image_name: str,
    spacing: tuple[float, ...],
) -> dict[str, Any]:
    """The sidecar's content: one entry per label value present in `labels` (painted-only labels too)."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    entries = []
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        if value == 0:
            continue
        run = dict(segments.get(int(value), {}))
        origin = "model" if run.get("model_hash") else "manual"
        entries.append({"label": int(value), "pixels": int(count), "origin": origin, **run})
    return {
        "label_file": label_file,
        "format": export_format(label_file),
        "image": {"name": image_name, "shape": list(np.shape(labels)), "spacing": [float(s) for s in spacing]},
        "segments": entries,
        "software": software_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def export_labels(
    path: str | Path,
    labels: np.ndarray,
    like,
    segments: Mapping[int, Mapping[str, Any]],
    *,
    image_name: str = "",
) -> tuple[Path, Path]:
    """Write `labels` in the format of `path`'s extension and its JSON sidecar; return both paths.

    `like` is the source `napari_mris.io.Slice` (geometry for NIfTI/NRRD, DICOM datasets for DICOM SEG);
    `segments` maps label value -> provenance (prompt, model id and hash, settings, timings).
    """
    path = Path(path)
    kind = export_format(path)
    labels = np.asarray(labels)
    if not np.any(labels):
        raise ExportError(f"Nothing to export to {path.name}: the labels are empty")
    if labels.shape != tuple(like.pixels.shape):
        raise ExportError(f"The labels {labels.shape} do not match their image {tuple(like.pixels.shape)}")
    try:
        _write_label_file(path, kind, labels, like, segments)
        sidecar = write_sidecar(path, labels, segments, image_name=image_name, spacing=like.spacing)
    except OSError as exc:
        raise ExportError(f"Cannot write {path}: {exc.strerror or exc}") from exc
    return path, sidecar


def write_sidecar(
    path: str | Path,
    labels: np.ndarray,
    segments: Mapping[int, Mapping[str, Any]],
    *,
    image_name: str,
    spacing: tuple[float, ...],
) -> Path:
    """Write the record of the label file `path` (already written) beside it, atomically; return its path."""
    path = Path(path)
    content = build_sidecar(labels, segments, label_file=path.name, image_name=image_name, spacing=spacing)
    content["label_file_sha256"] = _sha256(path)
    sidecar = sidecar_path(path)
    write_text_atomic(sidecar, json.dumps(content, indent=2, default=_json_default) + "\n")
    return sidecar


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_label_file(path: Path, kind: str, labels: np.ndarray, like, segments) -> None:
    from napari_mris.io import write_labels

    if kind == "DICOM SEG" and not like.dicom:
        source = like.source_path.name if like.source_path else "an image that was not opened from DICOM"
        raise ExportError(
            f"DICOM SEG needs a DICOM source image, but these labels belong to {source}; export PNG or NIfTI"
        )
    names = {int(v): str(run.get("prompt") or f"label {int(v)}") for v, run in segments.items()}
    write_labels(path, labels, like, names)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a sidecar")
