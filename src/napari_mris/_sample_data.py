"""npe2 sample-data contributions: a chest X-ray phantom and pydicom's CT_small.dcm.

Both are made from what is installed (the phantom is drawn in memory, CT_small ships inside pydicom), so
File > Open Sample works without the repository's sample_data/ folder.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_mris._reader import slice_layer_data
from napari_mris.io import Slice, read_slice
from napari_mris.phantom import make_phantom

PHANTOM_SEED = 7  # the same phantom as `napari-mris demo` and sample_data/img/phantom_07.png

LayerData = tuple[Any, dict[str, Any], str]


def make_phantom_sample(seed: int = PHANTOM_SEED) -> list[LayerData]:
    """A synthetic chest X-ray; its LViT-style description rides along as metadata['mris_description']."""
    phantom = make_phantom(seed)
    source = Slice(
        phantom.image,
        spacing=(1.0, 1.0),
        origin=(0.0, 0.0),
        direction=np.eye(2),
        window=(0.0, 255.0),
        name=f"phantom_{seed:02d}",
    )
    data, kwargs, layer_type = slice_layer_data(source)
    kwargs["name"] = "chest X-ray phantom"
    kwargs["metadata"]["mris_description"] = phantom.description
    return [(data, kwargs, layer_type)]


def make_ct_small_sample() -> list[LayerData]:
    """pydicom's 128x128 CT test slice, read like any user DICOM (HU, spacing, window, source dataset kept)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:  # pydicom installed without its test files
        from napari_mris.errors import ImageReadError

        raise ImageReadError("CT_small.dcm: not found among pydicom's bundled test files")
    data, kwargs, layer_type = slice_layer_data(read_slice(path, expect_2d=True))
    kwargs["name"] = "CT_small"
    return [(data, kwargs, layer_type)]
