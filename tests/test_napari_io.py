"""The napari adapters: reader (layer data, geometry, errors) and the npe2 labels writer."""

from __future__ import annotations

import hashlib
import json
import os

import highdicom as hd
import napari
import numpy as np
import pydicom
import pytest
from napari.components import ViewerModel
from napari.layers import Labels
from npe2 import PluginManager
from pydicom.pixels import apply_modality_lut

from napari_mris._reader import napari_get_reader, read_layers
from napari_mris._writer import write_labels
from napari_mris.errors import ImageReadError
from napari_mris.io import Slice, read_slice

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")


def test_get_reader_claims_only_supported_paths(tmp_path, ct_3slice):
    (tmp_path / "notes.txt").write_text("hello")
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path)) is None  # a folder without DICOM files
    assert napari_get_reader(str(ct_3slice / "01.dcm")) is read_layers
    assert napari_get_reader(str(ct_3slice)) is read_layers
    assert napari_get_reader([str(ct_3slice / "01.dcm"), str(tmp_path / "notes.txt")]) is None


def test_layer_data_of_a_ct_stack(ct_3slice):
    [(data, kwargs, layer_type)] = read_layers(str(ct_3slice))
    image = kwargs["metadata"]["mris_slice"]
    assert layer_type == "image" and isinstance(image, Slice) and data.shape == (3, 512, 512)
    assert kwargs["scale"] == image.spacing and kwargs["translate"] == image.origin
    assert kwargs["contrast_limits"] == image.window and kwargs["colormap"] == "gray"
    assert kwargs["name"] == "ct-3slice"


def test_reader_raises_mris_error_on_bad_file(tmp_path):
    (tmp_path / "bad.dcm").write_text("not dicom")
    reader = napari_get_reader(str(tmp_path / "bad.dcm"))
    with pytest.raises(ImageReadError, match=r"bad\.dcm.*not a DICOM file"):
        reader(str(tmp_path / "bad.dcm"))


@pytest.fixture
def viewer(request):
    """A Qt napari viewer where OpenGL can render, else napari's ViewerModel (the same open/reader/layer path).

    Qt's offscreen platform gets OpenGL only through an X server (e.g. `xvfb-run -a pytest`); without one,
    adding an image layer to a Qt viewer fails inside vispy before any plugin code is involved.
    """
    if os.environ.get("DISPLAY"):
        return request.getfixturevalue("make_napari_viewer")()
    PluginManager.instance().discover(include_npe1=False)  # what a Qt viewer does on start
    return ViewerModel()


def test_viewer_opens_ct_slice_in_hu_with_pixel_spacing(viewer, ct_3slice):
    path = ct_3slice / "01.dcm"
    [layer] = viewer.open(str(path), plugin="napari-mris")
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(layer.data, apply_modality_lut(ds.pixel_array, ds))
    np.testing.assert_allclose(layer.scale, [float(v) for v in ds.PixelSpacing])
    np.testing.assert_allclose(layer.contrast_limits, (-160.0, 239.0))
    assert layer.metadata["mris_slice"].dicom[0].SOPInstanceUID == ds.SOPInstanceUID


def test_napari_save_uses_source_slice_and_prompts(tmp_path, ct_3slice):
    image = read_slice(ct_3slice)
    labels = np.zeros(image.shape, np.uint8)
    labels[1, 200:260, 200:300] = 1
    runs = {1: {"prompt": "the liver", "model_id": "m", "model_hash": "ab12"}}
    metadata = {"mris_slice": image, "mris_segment_labels": {1: "the liver"}, "mris_runs": runs, "mris_image": "ct"}
    layer = Labels(labels, metadata=metadata)
    PluginManager.instance().discover(include_npe1=False)
    written = napari.save_layers(str(tmp_path / "out.dcm"), [layer], plugin="napari-mris")  # through the manifest
    assert written == [str(tmp_path / "out.dcm"), str(tmp_path / "out.dcm.mris.json")]
    record = json.loads((tmp_path / "out.dcm.mris.json").read_text())
    assert record["format"] == "DICOM SEG" and record["image"]["name"] == "ct"
    assert record["segments"][0]["model_hash"] == "ab12" and record["segments"][0]["origin"] == "model"
    assert record["label_file_sha256"] == hashlib.sha256((tmp_path / "out.dcm").read_bytes()).hexdigest()
    seg = hd.seg.segread(written[0])
    assert seg.get_segment_description(1).SegmentLabel == "the liver"
    assert seg.number_of_frames == 1  # empty planes are omitted; the one left refers to the painted slice
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    referenced = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    assert referenced == image.dicom[1].SOPInstanceUID


def test_npe2_writer_without_source_keeps_layer_scale(tmp_path):
    labels = np.zeros((6, 7), np.uint8)
    labels[2:4, 3:5] = 1
    meta = {"metadata": {}, "scale": (0.4, 0.9), "translate": (10.0, -3.0), "name": "Labels"}
    [path] = write_labels(str(tmp_path / "labels.nrrd"), labels, meta)  # not an MRIS layer: no sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nrrd"]
    read = read_slice(path)
    np.testing.assert_array_equal(read.pixels, labels)
    np.testing.assert_allclose(read.spacing, (0.4, 0.9))
    np.testing.assert_allclose(read.origin, (10.0, -3.0))
