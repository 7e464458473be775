"""napari writer for a Labels layer: PNG, NIfTI/NRRD/MHA or DICOM SEG, chosen by the file extension.

The source `Slice` (layer metadata `mris_slice`) gives the geometry and, for DICOM SEG, the referenced
images; `mris_segment_labels` ({label value: prompt}) names the segments. A layer made by the MRIS widget
also gets its provenance sidecar (`<file>.mris.json`, see `napari_mris.export`), as the widget's Export
writes it, so File > Save Selected Layers keeps the record of what the model drew too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_mris.export import write_sidecar
from napari_mris.io import Slice
from napari_mris.io import write_labels as write_label_file


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: returns the written paths (the label file, then its sidecar for MRIS layers)."""
    metadata = meta.get("metadata") or {}
    like = metadata.get("mris_slice")
    labels = np.asarray(data)
    if like is None and meta.get("scale") is not None:
        like = _geometry_only(labels.shape, meta)
    written = write_label_file(path, labels, like=like, segment_labels=metadata.get("mris_segment_labels"))
    if "mris_segment_labels" not in metadata:  # not an MRIS layer: no model provenance to record
        return [str(written)]
    spacing = like.spacing if like is not None else (1.0,) * labels.ndim
    sidecar = write_sidecar(
        written, labels, metadata.get("mris_runs") or {}, image_name=metadata.get("mris_image", ""), spacing=spacing
    )
    return [str(written), str(sidecar)]


def _geometry_only(shape: tuple[int, ...], meta: dict[str, Any]) -> Slice | None:
    """Labels not drawn on an MRIS image still keep the layer's scale/translate in NIfTI/NRRD."""
    scale = tuple(meta["scale"])
    translate = tuple(meta.get("translate") or (0.0,) * len(shape))
    if len(shape) not in (2, 3) or len(scale) != len(shape) or len(translate) != len(shape):
        return None
    return Slice(
        pixels=np.broadcast_to(np.float32(0), shape),
        spacing=scale,
        origin=translate,
        direction=np.eye(len(shape)),
        name=str(meta.get("name", "")),
    )
