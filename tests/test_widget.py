"""The MRIS widget in a headless napari viewer.

Most tests drive the widget with `ScriptedPipeline`, a stand-in that streams masks chosen by the test, so
that what the widget must do with them (label values, protected pixels, undo, stop) is checked exactly;
two tests run the real tiny model end to end (lazy loading in a worker, streaming into the layer).
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
from _model_fixtures import ScriptedPipeline, force_drawing
from PIL import Image as PILImage
from qtpy.QtCore import QThreadPool

from napari_mris._widget import LABELS_NAME, UNCERTAINTY_NAME, MRISWidget
from napari_mris.corrections import CorrectionsStore

WAIT_MS = 30_000  # generous: the test machine is a shared 2-core CPU

pytestmark = pytest.mark.skipif(
    os.environ.get("QT_QPA_PLATFORM") == "offscreen" and not os.environ.get("DISPLAY"),
    reason="napari's canvas needs OpenGL: run the widget tests under xvfb-run (offscreen Qt has no GL here)",
)


def box(shape, rows, cols) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def image_layer(viewer):
    rng = np.random.default_rng(0)
    return viewer.add_image(rng.random((40, 50)).astype(np.float32), name="slice", scale=(0.7, 0.7))


def make_widget(viewer, pipeline=None, prompt="lower left lung") -> MRISWidget:
    widget = MRISWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MRIS")
    if pipeline is not None:
        widget.set_pipeline(pipeline)
    widget.set_prompt(prompt)
    return widget


def run(qtbot, widget: MRISWidget) -> None:
    widget.segment()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)


def test_widget_selects_the_model_s_preferred_order(viewer, tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"default_order": "raster"}')
    widget = MRISWidget(viewer)
    widget.order_combo.setCurrentIndex(widget.order_combo.findData("scale"))
    widget.set_model(tmp_path)
    assert widget.order_combo.currentData() == "raster"
    widget.order_combo.setCurrentIndex(widget.order_combo.findData("scale"))
    widget._show_model()  # refreshing the model line (as after loading) keeps the user's choice
    assert widget.order_combo.currentData() == "scale"


def test_choosing_a_folder_that_is_not_a_model_says_so_at_once(viewer, tmp_path, monkeypatch) -> None:
    from napari_mris import _widget

    widget = MRISWidget(viewer)
    monkeypatch.setattr(_widget.QFileDialog, "getExistingDirectory", lambda *a: str(tmp_path))
    widget.model_button.click()
    assert widget.model == tmp_path and widget.pipeline is None
    assert "is not a napari-mris model directory: it has no config.json" in widget.status_label.text()


def test_segment_button_needs_an_image_and_a_prompt(viewer) -> None:
    widget = make_widget(viewer, prompt="")
    assert not widget.segment_button.isEnabled()
    viewer.add_image(np.zeros((8, 8), np.float32), name="a")
    assert widget.image_layer().name == "a" and not widget.segment_button.isEnabled()
    widget.set_prompt("  lung \n")
    assert widget.segment_button.isEnabled() and not widget.stop_button.isEnabled()
    viewer.add_image(np.zeros((8, 8), np.float32), name="b")
    assert [layer.name for layer in widget.image_picker.choices] == ["a", "b"]
    assert widget.image_layer().name == "a"  # a new layer leaves the choice alone
    viewer.layers.remove("a")
    viewer.layers.remove("b")
    assert widget.image_picker.choices == () and widget.image_layer() is None
    assert not widget.segment_button.isEnabled()
    assert widget.pipeline is None  # nothing was loaded by constructing the widget


def test_image_picker_follows_the_viewer_s_layers(viewer) -> None:
    """The magicgui layer picker: images only, a renamed one by its new name; a removed choice falls to the newest."""
    widget = make_widget(viewer)
    for name in ("a", "b", "c"):
        viewer.add_image(np.zeros((8, 8), np.float32), name=name)
    viewer.add_labels(np.zeros((8, 8), np.uint16), name="not an image")
    assert widget.image_layer().name == "a"
    viewer.layers["b"].name = "b2"
    assert sorted(layer.name for layer in widget.image_picker.choices) == ["a", "b2", "c"]
    viewer.layers.remove("a")
    assert widget.image_layer() is viewer.layers["c"]


def test_scripted_segmentation_fills_one_label_as_one_undo_step(viewer, image_layer, qtbot) -> None:
    shape = image_layer.data.shape
    masks = [box(shape, slice(0, 20), slice(0, 50)), box(shape, slice(5, 20), slice(10, 30)), box(shape, 5, 5)]
    masks[-1] = box(shape, slice(5, 15), slice(10, 25))
    widget = make_widget(viewer, ScriptedPipeline(masks))
    run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    assert labels.data.shape == shape and tuple(labels.scale) == tuple(image_layer.scale)
    np.testing.assert_array_equal(labels.data == 1, masks[-1])
    assert labels.metadata["mris_segment_labels"] == {1: "lower left lung"}
    assert labels.metadata["mris_runs"][1]["model_hash"] == "0123456789abcdef"
    assert list(labels.features["prompt"]) == ["", "lower left lung"]
    assert labels.editable and widget.progress_bar.value() == 100
    assert widget.status_label.text().startswith("Done: label 1")
    labels.undo()  # all three streamed updates go away with one Ctrl+Z
    assert not labels.data.any()
    labels.redo()
    np.testing.assert_array_equal(labels.data == 1, masks[-1])


def test_second_prompt_never_overwrites_other_labels(viewer, image_layer, qtbot) -> None:
    shape = image_layer.data.shape
    full = np.ones(shape, bool)
    widget = make_widget(viewer, ScriptedPipeline([box(shape, slice(0, 10), slice(0, 10))]))
    run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    user = (slice(20, 30), slice(0, 50))
    labels.data_setitem(np.nonzero(box(shape, *user)), 1)  # the user paints more of label 1
    before_one = labels.data == 1
    widget.set_pipeline(ScriptedPipeline([full]))  # the second finding's mask covers the whole image
    widget.set_prompt("upper right lung")
    run(qtbot, widget)
    np.testing.assert_array_equal(labels.data == 1, before_one)  # every label-1 pixel survived
    np.testing.assert_array_equal(labels.data == 2, ~before_one)
    assert labels.metadata["mris_segment_labels"] == {1: "lower left lung", 2: "upper right lung"}
    assert [widget.history_combo.itemText(i) for i in range(2)] == ["upper right lung", "lower left lung"]
    widget.history_combo.activated.emit(1)  # picking an earlier prompt puts it back in the prompt box
    assert widget.prompt() == "lower left lung"
    labels.undo()  # undoes the second segmentation only
    np.testing.assert_array_equal(labels.data == 1, before_one)
    assert not (labels.data == 2).any()


def test_same_prompt_again_reuses_its_label(viewer, image_layer, qtbot) -> None:
    shape = image_layer.data.shape
    widget = make_widget(viewer, ScriptedPipeline([box(shape, slice(0, 10), slice(0, 10))]))
    run(qtbot, widget)
    widget.set_pipeline(ScriptedPipeline([box(shape, slice(30, 40), slice(0, 10))]))
    widget.set_prompt("Lower LEFT lung")
    run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    np.testing.assert_array_equal(labels.data == 1, box(shape, slice(30, 40), slice(0, 10)))
    assert set(np.unique(labels.data)) == {0, 1}


def test_stop_keeps_the_partial_mask(viewer, image_layer, qtbot) -> None:
    shape = image_layer.data.shape
    gate = threading.Event()
    first, last = box(shape, slice(0, 10), slice(0, 10)), box(shape, slice(0, 40), slice(0, 50))
    widget = make_widget(viewer, ScriptedPipeline([first, last], gate=gate))
    widget.segment()
    labels = viewer.layers[LABELS_NAME]
    qtbot.waitUntil(lambda: (labels.data == 1).any(), timeout=WAIT_MS)
    assert widget.stop_button.isEnabled() and not widget.segment_button.isEnabled()
    assert not labels.editable  # no painting while the model draws
    started = time.perf_counter()
    widget.stop()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    assert time.perf_counter() - started < 2.0
    gate.set()
    qtbot.wait(50)
    np.testing.assert_array_equal(labels.data == 1, first)  # kept as drawn; the later update never arrives
    assert "Stopped" in widget.status_label.text() and labels.editable
    labels.undo()
    assert not labels.data.any()


def test_rejection_leaves_the_layer_alone(viewer, image_layer, qtbot) -> None:
    shape = image_layer.data.shape
    widget = make_widget(viewer, ScriptedPipeline([np.zeros(shape, bool)], rejected=True))
    run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    assert not labels.data.any() and labels.metadata["mris_segment_labels"] == {}
    text = widget.status_label.text()
    assert text.startswith("Not present: no lesion found for “lower left lung”") and "not present" in text


def test_an_empty_answer_is_not_present_and_keeps_the_earlier_drawing(viewer, image_layer, qtbot) -> None:
    """Present but nothing drawn (the tokens touched no lesion): the streamed rows are taken back, and an
    earlier drawing of the same finding (same label value) is left exactly as it was."""
    shape = image_layer.data.shape
    earlier = box(shape, slice(2, 12), slice(2, 12))
    widget = make_widget(viewer, ScriptedPipeline([earlier]))
    run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    before = labels.data.copy()
    streamed = box(shape, slice(20, 30), slice(20, 30))  # a partial drawing the finished answer withdraws
    widget.set_pipeline(ScriptedPipeline([streamed, np.zeros(shape, bool)]))
    run(qtbot, widget)
    np.testing.assert_array_equal(labels.data, before)
    assert labels.metadata["mris_segment_labels"] == {1: "lower left lung"}
    text = widget.status_label.text()
    assert text.startswith("Not present") and "drew no lesion" in text and "label 1 unchanged" in text


def test_samples_show_an_uncertainty_layer(viewer, image_layer, qtbot) -> None:
    shape = image_layer.data.shape
    uncertainty = np.full(shape, 0.25, np.float32)
    pipeline = ScriptedPipeline([box(shape, slice(0, 10), slice(0, 10))], uncertainty=uncertainty)
    widget = make_widget(viewer, pipeline)
    widget.samples_spin.setValue(3)
    widget.order_combo.setCurrentIndex(widget.order_combo.findData("raster"))
    run(qtbot, widget)
    assert pipeline.calls[0]["samples"] == 3 and pipeline.calls[0]["order"] == "raster"
    layer = viewer.layers[UNCERTAINTY_NAME]
    np.testing.assert_array_equal(layer.data, uncertainty)
    assert [layer.name for layer in widget.image_picker.choices] == ["slice"]  # never the uncertainty layer


def test_stack_segments_the_current_plane(viewer, qtbot) -> None:
    stack = viewer.add_image(np.random.default_rng(1).random((4, 30, 20)).astype(np.float32), name="stack")
    viewer.dims.set_current_step(0, 2)
    widget = make_widget(viewer, ScriptedPipeline(lambda shape: [np.ones(shape, bool)]))
    run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    assert labels.data.shape == stack.data.shape
    assert (labels.data[2] == 1).all() and not labels.data[[0, 1, 3]].any()


def test_bad_layers_and_models_give_messages_not_crashes(viewer, qtbot, tmp_path) -> None:
    viewer.add_image(np.zeros((16, 16, 3), np.uint8), name="photo", rgb=True)
    widget = make_widget(viewer)
    widget.segment()
    assert "RGB" in widget.status_label.text() and not widget.is_running
    viewer.layers.remove("photo")
    viewer.add_image(np.zeros((16, 16), np.float32), name="gray")
    widget.set_model(tmp_path / "no-model-here")
    run(qtbot, widget)
    assert "Model directory not found" in widget.status_label.text()
    assert widget.pipeline is None and widget.segment_button.isEnabled()


def test_export_png_nifti_and_sidecar(viewer, image_layer, qtbot, tmp_path) -> None:
    import SimpleITK as sitk

    shape = image_layer.data.shape
    mask = box(shape, slice(5, 25), slice(10, 30))
    widget = make_widget(viewer, ScriptedPipeline([mask]))
    assert widget.export_to(tmp_path / "early.png") is None and "Nothing to export" in widget.status_label.text()
    run(qtbot, widget)
    png, sidecar = widget.export_to(tmp_path / "out" / "mask.png")
    np.testing.assert_array_equal(np.asarray(PILImage.open(png)), mask.astype(np.uint8) * 255)
    content = json.loads(sidecar.read_text())
    (segment,) = content["segments"]
    assert segment["label"] == 1 and segment["prompt"] == "lower left lung" and segment["pixels"] == mask.sum()
    assert (
        segment["model_hash"] == "0123456789abcdef" and segment["settings"]["order"] == widget.order_combo.currentData()
    )
    assert content["image"]["spacing"] == [0.7, 0.7] and "napari-mris" in content["software"]
    nifti, _ = widget.export_to(tmp_path / "mask.nii.gz")
    volume = sitk.ReadImage(str(nifti))
    assert sitk.GetArrayFromImage(volume).squeeze().shape == shape
    assert volume.GetSpacing()[:2] == pytest.approx((0.7, 0.7))
    assert widget.export_to(tmp_path / "mask.dcm") is None
    assert "DICOM SEG needs a DICOM source" in widget.status_label.text()
    assert not (tmp_path / "mask.dcm").exists()


def test_save_as_training_example(viewer, image_layer, qtbot, tmp_path) -> None:
    shape = image_layer.data.shape
    predicted = box(shape, slice(5, 25), slice(10, 30))
    widget = make_widget(viewer, ScriptedPipeline([predicted]))
    widget.corrections.root = tmp_path / "corrections"
    run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    labels.data_setitem(np.nonzero(box(shape, slice(25, 30), slice(10, 30))), 1)  # the radiologist's correction
    record = widget.save_example()
    store = CorrectionsStore(tmp_path / "corrections")
    assert [r.name for r in store.records()] == [record.name] and record.model_hash == "0123456789abcdef"
    saved = np.asarray(PILImage.open(store.root / record.mask)) == 255
    np.testing.assert_array_equal(saved, labels.data == 1)
    np.testing.assert_array_equal(np.asarray(PILImage.open(store.root / record.prediction)) == 255, predicted)
    assert record.spacing == (0.7, 0.7)


def test_real_model_loads_lazily_and_streams_into_the_layer(viewer, image_layer, qtbot, tiny_model_dir) -> None:  # noqa: F811
    widget = make_widget(viewer)
    widget.set_model(tiny_model_dir)
    assert widget.pipeline is None
    run(qtbot, widget)
    assert widget.pipeline is not None and widget.pipeline.model_hash[:8] in widget.model_label.text()
    text = widget.status_label.text()
    assert text.startswith(("Done: label 1", "Not present")), text
    with force_drawing(widget.pipeline):
        widget.set_prompt("upper right lung")
        run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    assert widget.status_label.text().startswith("Done: label"), widget.status_label.text()
    value = max(labels.metadata["mris_segment_labels"])
    run_info = labels.metadata["mris_runs"][value]
    assert run_info["model_hash"] == widget.pipeline.model_hash and run_info["finished"]


def test_closing_the_viewer_mid_stream_stops_the_worker(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((20, 20), np.float32), name="slice")
    gate = threading.Event()
    widget = make_widget(viewer, ScriptedPipeline([np.ones(image.data.shape, bool)] * 2, gate=gate))
    widget.segment()
    canceller = widget._canceller
    qtbot.waitUntil(lambda: (viewer.layers[LABELS_NAME].data == 1).any(), timeout=WAIT_MS)
    viewer.close()
    qtbot.waitUntil(canceller.event.is_set, timeout=WAIT_MS)
    assert QThreadPool.globalInstance().waitForDone(5_000)  # the worker thread ended without the gate opening
    assert not gate.is_set()


def test_export_dicom_seg_for_a_dicom_image(viewer, qtbot, tmp_path) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    from napari_mris.io import read_slice

    source = read_slice(get_testdata_file("CT_small.dcm"))
    viewer.add_image(source.pixels, name="ct", scale=source.spacing, metadata={"mris_slice": source})
    mask = box(source.pixels.shape, slice(30, 60), slice(40, 90))
    widget = make_widget(viewer, ScriptedPipeline([mask]), prompt="liver")
    run(qtbot, widget)
    seg_path, sidecar = widget.export_to(tmp_path / "liver.dcm")
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "liver"
    assert json.loads(sidecar.read_text())["format"] == "DICOM SEG"


def test_several_findings_get_one_label_and_one_undo_step_each(viewer, image_layer, qtbot) -> None:
    """One finding per line: label 1 and 2 named after their findings (layer features), drawn in turn; a
    finding never overwrites an earlier finding's pixels; Ctrl+Z takes back one finding at a time."""
    shape = image_layer.data.shape
    first = box(shape, slice(0, 20), slice(0, 20))
    second = [box(shape, slice(30, 35), slice(30, 35)), box(shape, slice(10, 40), slice(10, 40))]
    pipeline = ScriptedPipeline({"lower left lung": [first], "upper right lung": second})
    widget = make_widget(viewer, pipeline, prompt="\n  lower  left lung\nupper right lung\n")
    run(qtbot, widget)
    assert [call["prompt"] for call in pipeline.calls] == ["lower left lung", "upper right lung"]
    labels = viewer.layers[LABELS_NAME]
    np.testing.assert_array_equal(labels.data == 1, first)
    np.testing.assert_array_equal(labels.data == 2, second[-1] & ~first)  # the overlap stays with finding 1
    assert labels.metadata["mris_segment_labels"] == {1: "lower left lung", 2: "upper right lung"}
    assert list(labels.features["prompt"]) == ["", "lower left lung", "upper right lung"]
    assert set(labels.metadata["mris_runs"]) == {1, 2} and labels.editable
    overlap = int((second[-1] & first).sum())
    expected = f"Done: label 2, {int((second[-1] & ~first).sum())} pixels ({overlap} of its mask kept by other labels)"
    assert widget.status_label.text().startswith(expected), widget.status_label.text()
    labels.undo()
    np.testing.assert_array_equal(labels.data == 1, first)
    assert not (labels.data == 2).any()
    labels.undo()
    assert not labels.data.any()


def test_stop_during_a_finding_keeps_earlier_findings_and_starts_none_of_the_rest(viewer, image_layer, qtbot) -> None:
    shape = image_layer.data.shape
    gate = threading.Event()
    first = box(shape, slice(0, 10), slice(0, 10))
    partial, whole = box(shape, slice(20, 25), slice(0, 10)), box(shape, slice(20, 40), slice(0, 10))
    pipeline = ScriptedPipeline({"a lung": [first], "b lung": [partial, whole], "c lung": [whole]}, gate=gate)
    widget = make_widget(viewer, pipeline, prompt="a lung\nb lung\nc lung")
    widget.segment()  # finding 2 waits at the gate after its first update
    labels = viewer.layers[LABELS_NAME]
    qtbot.waitUntil(lambda: (labels.data == 2).any(), timeout=WAIT_MS)
    widget.stop()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    gate.set()
    qtbot.wait(50)
    assert [call["prompt"] for call in pipeline.calls] == ["a lung", "b lung"]  # the third never started
    np.testing.assert_array_equal(labels.data == 1, first)
    np.testing.assert_array_equal(labels.data == 2, partial)
    assert not (labels.data == 3).any()
    assert "1 later finding not started" in widget.status_label.text()
    labels.undo()  # the stopped finding's partial mask is its own undo step
    np.testing.assert_array_equal(labels.data == 1, first)
    assert not (labels.data == 2).any()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lower left lung\n\nupper right lung", "Finding 2 of 3 is empty"),
        ("lower left lung\nLower left  lung", "Finding 2 repeats finding 1"),
        ("\n".join(f"zone {i}" for i in range(9)), "more than the 8"),
    ],
)
def test_a_bad_list_of_findings_is_refused_and_nothing_drawn_is_lost(viewer, image_layer, qtbot, text, message) -> None:
    shape = image_layer.data.shape
    earlier = box(shape, slice(0, 10), slice(0, 10))
    pipeline = ScriptedPipeline([earlier])
    widget = make_widget(viewer, pipeline)
    run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    before = labels.data.copy()
    widget.set_prompt(text)
    widget.segment()
    assert not widget.is_running and message in widget.status_label.text()
    assert len(pipeline.calls) == 1  # nothing new was decoded
    np.testing.assert_array_equal(labels.data, before)
    assert labels.metadata["mris_segment_labels"] == {1: "lower left lung"} and labels.editable


def test_count_lesions_reports_a_mismatch_and_keeps_the_mask(viewer, image_layer, qtbot) -> None:
    shape = image_layer.data.shape
    two = box(shape, slice(0, 5), slice(0, 5)) | box(shape, slice(20, 30), slice(20, 30))
    widget = make_widget(viewer, ScriptedPipeline([two]), prompt="Unilateral pulmonary infection, one infected area")
    widget.lesions_check.setChecked(True)
    run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    np.testing.assert_array_equal(labels.data == 1, two)  # the prompt's count never changes the mask
    text = widget.status_label.text()
    assert "2 lesion(s)" in text and "2 lesions drawn, the prompt says 1" in text, text
    assert labels.metadata["mris_runs"][1]["lesions"] == 2 and labels.metadata["mris_runs"][1]["stated_lesions"] == 1


def test_two_findings_with_the_real_model(viewer, image_layer, qtbot, tiny_pipeline) -> None:  # noqa: F811
    """The real pipeline streams both findings through the widget's worker, one label each."""
    widget = make_widget(viewer, tiny_pipeline, prompt="lower left lung\nupper right lung")
    widget.order_combo.setCurrentIndex(widget.order_combo.findData("scale"))
    with force_drawing(tiny_pipeline):
        run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    assert labels.metadata["mris_segment_labels"] == {1: "lower left lung", 2: "upper right lung"}
    assert (labels.data == 1).any() and labels.editable
    runs = labels.metadata["mris_runs"]
    assert runs[1]["model_hash"] == runs[2]["model_hash"] == tiny_pipeline.model_hash


def test_an_overlong_prompt_is_refused_by_the_real_model_and_nothing_drawn_is_lost(
    viewer,
    image_layer,
    qtbot,
    tiny_pipeline,  # noqa: F811
) -> None:
    """A finding longer than the model reads (its place named at the end) is refused in plain words, not
    answered for its first tokens; the labels drawn before stay as they were."""
    widget = make_widget(viewer, tiny_pipeline)
    with force_drawing(tiny_pipeline):
        run(qtbot, widget)
    labels = viewer.layers[LABELS_NAME]
    before = labels.data.copy()
    limit = tiny_pipeline.tokenizers.text.max_length
    widget.set_prompt("bilateral pulmonary infection " * limit + "in the upper right lung")
    run(qtbot, widget)
    assert f"reads at most {limit}" in widget.status_label.text(), widget.status_label.text()
    np.testing.assert_array_equal(labels.data, before)
    assert labels.metadata["mris_segment_labels"] == {1: "lower left lung"} and labels.editable


def test_several_findings_export_one_segment_each(viewer, qtbot, tmp_path, ct_3slice) -> None:
    """Two findings on a DICOM slice: a DICOM SEG with one segment per finding (its prompt as the segment's
    label and description) and NRRD / NIfTI label maps whose sidecar lists every label with its prompt."""
    import highdicom as hd
    import SimpleITK as sitk

    from napari_mris.io import read_slice

    source = read_slice(ct_3slice / "01.dcm", expect_2d=True)
    viewer.add_image(source.pixels, name="ct", scale=source.spacing, metadata={"mris_slice": source})
    shape = source.pixels.shape
    findings = ["liver lesion", ", ".join(["a long description of the second finding"] * 3)]
    pipeline = ScriptedPipeline(
        {findings[0]: [box(shape, slice(200, 260), slice(200, 300))], findings[1]: [box(shape, slice(300, 340), 50)]}
    )
    widget = make_widget(viewer, pipeline, prompt="\n".join(findings))
    run(qtbot, widget)
    seg_path, seg_sidecar = widget.export_to(tmp_path / "two.dcm")
    seg = hd.seg.segread(seg_path)
    described = [seg.get_segment_description(n) for n in (1, 2)]
    assert [d.SegmentLabel for d in described] == [findings[0], findings[1][:64].strip()]
    assert described[1].SegmentDescription == findings[1]
    for suffix in (".nrrd", ".nii.gz"):
        path, sidecar = widget.export_to(tmp_path / f"two{suffix}")
        data = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).squeeze()
        assert set(np.unique(data)) == {0, 1, 2}
        table = {s["label"]: s["prompt"] for s in json.loads(sidecar.read_text())["segments"]}
        assert table == {1: findings[0], 2: findings[1]}
    assert json.loads(seg_sidecar.read_text())["segments"][1]["origin"] == "model"
