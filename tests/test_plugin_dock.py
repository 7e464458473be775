"""The widget as napari docks it from Plugins > MRIS (npe2 manifest), headless.

napari hands a plugin's widget a `PublicOnlyProxy` of the viewer, and every layer read through it is a new
proxy object; the widget built by hand in test_widget.py sees the real viewer. These tests go through
`add_plugin_dock_widget`, the path a user takes. Like test_widget.py they need napari's OpenGL canvas:
offscreen Qt gets it through an X server (Xvfb, started by pytest-xvfb), and skips without one.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from _model_fixtures import ScriptedPipeline
from napari.utils._proxies import PublicOnlyProxy
from PIL import Image as PILImage
from pydicom.data import get_testdata_file

from napari_mris._widget import LABELS_NAME, MRISWidget
from napari_mris.corrections import CorrectionsStore
from napari_mris.io import read_slice

WAIT_MS = 30_000

pytestmark = pytest.mark.skipif(
    os.environ.get("QT_QPA_PLATFORM") == "offscreen" and not os.environ.get("DISPLAY"),
    reason="napari's canvas needs OpenGL: run the widget tests under xvfb-run (offscreen Qt has no GL here)",
)


def docked_widget(viewer, masks, prompt: str) -> MRISWidget:
    _, widget = viewer.window.add_plugin_dock_widget("napari-mris", "MRIS")
    assert isinstance(widget, MRISWidget) and isinstance(widget.viewer, PublicOnlyProxy)
    widget.set_pipeline(ScriptedPipeline(masks))
    widget.set_prompt(prompt)
    return widget


def segment(qtbot, widget: MRISWidget) -> None:
    widget.segment()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    assert widget.status_label.text().startswith("Done"), widget.status_label.text()


def test_plugin_widget_saves_the_model_s_prediction(make_napari_viewer, qtbot, tmp_path) -> None:
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((40, 50)).astype(np.float32), name="slice", scale=(0.7, 0.7))
    predicted = np.zeros((40, 50), bool)
    predicted[5:25, 10:30] = True
    widget = docked_widget(viewer, [predicted], "lower left lung")
    widget.corrections.root = tmp_path / "corrections"
    segment(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    labels.data_setitem(np.nonzero(np.pad(np.ones((5, 20), bool), ((25, 10), (10, 20)))), 1)  # the correction

    record = widget.save_example()
    assert record is not None and record.prediction is not None, widget.status_label.text()
    root = tmp_path / "corrections"
    np.testing.assert_array_equal(np.asarray(PILImage.open(root / record.prediction)) == 255, predicted)
    np.testing.assert_array_equal(np.asarray(PILImage.open(root / record.mask)) == 255, labels.data == 1)
    assert CorrectionsStore(root).records()[0].model_hash == "0123456789abcdef"


def test_plugin_widget_exports_keep_one_record_per_file(make_napari_viewer, qtbot, tmp_path) -> None:
    viewer = make_napari_viewer()
    source = read_slice(get_testdata_file("CT_small.dcm"))
    viewer.add_image(source.pixels, name="ct", scale=source.spacing, metadata={"mris_slice": source})
    mask = np.zeros(source.pixels.shape, bool)
    mask[30:60, 40:90] = True
    widget = docked_widget(viewer, [mask], "liver")
    segment(qtbot, widget)

    names = ["liver.png", "liver.nii.gz", "liver.nrrd", "liver.dcm"]
    for name in names:
        written = widget.export_to(tmp_path / name)
        assert written is not None, widget.status_label.text()
        assert written[1].name == name + ".mris.json"
    for name, kind in zip(names, ["PNG", "NIfTI", "NRRD", "DICOM SEG"], strict=True):
        record = json.loads((tmp_path / (name + ".mris.json")).read_text())  # none overwritten by a later export
        assert record["label_file"] == name and record["format"] == kind
        assert record["label_file_sha256"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        (segment_record,) = record["segments"]
        assert segment_record["prompt"] == "liver" and segment_record["model_hash"] == "0123456789abcdef"
    assert len(list(tmp_path.glob("*.mris.json"))) == 4
