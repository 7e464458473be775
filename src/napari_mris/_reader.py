"""napari reader: any input `read_slice` supports becomes an image layer with its physical geometry.

The `Slice` rides along in the layer metadata (`mris_slice`), so the widget and the writer can reach the
source DICOM datasets and geometry. Errors are `MRISError`s, which napari shows as a notification.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_mris.io import Slice, image_kind, read_slice

LayerData = tuple[Any, dict[str, Any], str]


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return `read_layers` when every path is a supported image (or a folder with DICOM files), else None."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths or any(image_kind(Path(p)) is None for p in paths):
        return None
    return read_layers


def read_layers(path: str | list[str]) -> list[LayerData]:
    """One image layer per path."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    return [slice_layer_data(read_slice(Path(p))) for p in paths]


def slice_layer_data(image: Slice) -> LayerData:
    """A napari image layer tuple for `image`: physical scale/translate, the file's VOI window, gray colormap.

    The direction cosines are not applied: like radiology viewers, the slice is shown in its acquisition grid.
    """
    kwargs: dict[str, Any] = {
        "name": image.name,
        "scale": image.spacing,
        "translate": image.origin,
        "colormap": "gray",
        "metadata": {"mris_slice": image},
    }
    if image.window is not None:
        kwargs["contrast_limits"] = image.window
    return image.pixels, kwargs, "image"
