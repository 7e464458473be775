"""`LabelsController` alone: streamed masks into a Labels layer on a bare `ViewerModel` (no Qt, no dock).

The dock widget's tests check the same rules through its buttons and worker; these pin them down where they
live: what a partial update draws, one undo step per finding, Stop keeping a partial mask, and an answer
"not present" (or an error) taking the streamed rows back.
"""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_mris._labels_controller import LABELS_NAME, UNCERTAINTY_NAME, LabelsController
from napari_mris.errors import PromptError, UnsupportedImageError
from napari_mris.pipeline import DecodingSettings, StreamUpdate

SHAPE = (12, 16)
SETTINGS = {"order": "raster", "samples": 1}


class Provenance:
    """What the controller records of the pipeline that drew a finding."""

    model_id = "scripted"
    model_hash = "0123456789abcdef"
    adapter = None

    def settings(self, **options) -> DecodingSettings:
        return DecodingSettings(**options)


def rows(*spans: tuple[int, int]) -> np.ndarray:
    """A mask of whole rows, as a raster stream draws them."""
    mask = np.zeros(SHAPE, bool)
    for start, stop in spans:
        mask[start:stop] = True
    return mask


def update(mask: np.ndarray, *, finished: bool = False, rejected: bool = False, uncertainty=None) -> StreamUpdate:
    return StreamUpdate(
        mask=mask, probability=None, uncertainty=uncertainty, progress=1.0 if finished else 0.5, tokens_done=1,
        tokens_total=2, rejected=rejected, finished=finished, timings={"total_s": 0.1},
    )  # fmt: skip


@pytest.fixture
def viewer() -> ViewerModel:
    model = ViewerModel()
    model.add_image(np.random.default_rng(0).random(SHAPE).astype(np.float32), name="slice", scale=(0.5, 0.5))
    return model


def start(controller: LabelsController, viewer: ViewerModel, *findings: str, count_lesions: bool = False):
    run = controller.start(viewer.layers["slice"], list(findings), SETTINGS, count_lesions=count_lesions)
    controller.stream_started(Provenance())
    return run


def stream(controller: LabelsController, *masks: np.ndarray, index: int = 0, **last):
    """Feed the updates of one finding, as the dock does: each is drawn; the last one also finishes it."""
    run = controller.current(index)
    for mask in masks[:-1]:
        controller.draw(run, update(mask))
    final = update(masks[-1], finished=True, **last)
    controller.draw(run, final)
    return controller.finish(final)


def test_partial_masks_are_drawn_and_the_finding_is_one_undo_step(viewer) -> None:
    controller = LabelsController(viewer)
    run = start(controller, viewer, "lower left lung")
    labels = viewer.layers[LABELS_NAME]
    assert labels.data.shape == SHAPE and tuple(labels.scale) == (0.5, 0.5) and not labels.editable
    controller.draw(run, update(rows((0, 2))))
    np.testing.assert_array_equal(labels.data == 1, rows((0, 2)))  # drawn at once, before the end
    controller.draw(run, update(rows((0, 4))))
    final = update(rows((1, 5)), finished=True)  # a final mask can drop earlier rows
    controller.draw(run, final)
    done = controller.finish(final)
    np.testing.assert_array_equal(labels.data == 1, rows((1, 5)))
    assert done.held == 4 * SHAPE[1] and done.kept_by_others == 0 and labels.editable
    assert labels.metadata["mris_segment_labels"] == {1: "lower left lung"}
    assert labels.metadata["mris_runs"][1]["model_hash"] == Provenance.model_hash
    np.testing.assert_array_equal(labels.metadata["mris_predictions"][1]["mask"], rows((1, 5)))
    labels.undo()  # the three updates are one history item
    assert not labels.data.any()
    labels.redo()
    np.testing.assert_array_equal(labels.data == 1, rows((1, 5)))


def test_a_finding_never_overwrites_another_label(viewer) -> None:
    controller = LabelsController(viewer)
    start(controller, viewer, "a lung")
    stream(controller, rows((0, 6)))
    labels = viewer.layers[LABELS_NAME]
    labels.data_setitem(np.nonzero(rows((10, 12))), 7)  # painted by hand
    start(controller, viewer, "b lung")
    done = stream(controller, rows((0, 12)))
    assert done.run.value == 8  # the next free value above everything in the layer
    np.testing.assert_array_equal(labels.data == 1, rows((0, 6)))
    np.testing.assert_array_equal(labels.data == 7, rows((10, 12)))
    np.testing.assert_array_equal(labels.data == 8, rows((6, 10)))
    assert done.kept_by_others == 8 * SHAPE[1]


def test_not_present_takes_back_the_streamed_rows_and_keeps_the_earlier_drawing(viewer) -> None:
    controller = LabelsController(viewer)
    start(controller, viewer, "lower left lung")
    stream(controller, rows((0, 3)))
    labels = viewer.layers[LABELS_NAME]
    before = labels.data.copy()
    start(controller, viewer, "Lower LEFT lung")  # the same finding again: the same label value
    done = stream(controller, rows((6, 9)), np.zeros(SHAPE, bool))  # streamed rows, then nothing drawn
    np.testing.assert_array_equal(labels.data, before)
    assert done.held == 0 and done.run.value == 1 and labels.editable
    assert labels.metadata["mris_segment_labels"] == {1: "Lower LEFT lung"}
    start(controller, viewer, "upper right lung")
    done = stream(controller, rows((8, 10)), rows((8, 12)), rejected=True)  # [REJ]
    np.testing.assert_array_equal(labels.data, before)
    assert 2 not in labels.metadata["mris_segment_labels"]  # no label value for a finding never drawn


def test_stop_keeps_the_partial_mask_as_one_undo_step_and_starts_no_later_finding(viewer) -> None:
    controller = LabelsController(viewer)
    run = start(controller, viewer, "a lung", "b lung", "c lung")
    assert controller.which() == "finding 1 of 3: " and controller.prompts() == ["a lung", "b lung", "c lung"]
    stream(controller, rows((0, 2)))
    labels = viewer.layers[LABELS_NAME]
    assert not labels.editable  # locked until the last finding: locking again would clear the undo history
    second = controller.next_finding(run)
    assert second.value == 2 and controller.which() == "finding 2 of 3: "
    assert controller.current(0) is None and controller.current(1) is second  # the first one's updates are late
    controller.draw(second, update(rows((4, 6))))
    stopped = controller.stop()
    assert stopped.kept and stopped.skipped == 1 and labels.editable and not controller.active
    np.testing.assert_array_equal(labels.data == 2, rows((4, 6)))
    labels.undo()
    np.testing.assert_array_equal(labels.data == 1, rows((0, 2)))
    assert not (labels.data == 2).any()
    assert controller.stop() is None  # nothing left to stop


def test_an_error_takes_back_only_the_current_finding(viewer) -> None:
    controller = LabelsController(viewer)
    run = start(controller, viewer, "a lung", "b lung")
    stream(controller, rows((0, 2)))
    second = controller.next_finding(run)
    controller.draw(second, update(rows((5, 7))))
    controller.abort()
    labels = viewer.layers[LABELS_NAME]
    np.testing.assert_array_equal(labels.data, np.where(rows((0, 2)), 1, 0))
    assert labels.editable and not controller.active


def test_removing_the_image_keeps_the_drawing(viewer) -> None:
    controller = LabelsController(viewer)
    run = start(controller, viewer, "a lung")
    controller.draw(run, update(rows((2, 4))))
    labels = viewer.layers[LABELS_NAME]
    other = viewer.add_image(np.zeros(SHAPE, np.float32), name="other")
    assert not controller.release(other) and controller.active  # not a layer of this run
    viewer.layers.remove("slice")
    assert controller.release(run.image) and not controller.active and labels.editable
    np.testing.assert_array_equal(labels.data == 1, rows((2, 4)))


def test_uncertainty_lesion_counts_and_the_plane_of_a_stack() -> None:
    viewer = ViewerModel()
    stack = viewer.add_image(np.zeros((3, *SHAPE), np.float32), name="slice")
    viewer.dims.set_current_step(0, 2)
    controller = LabelsController(viewer)
    start(controller, viewer, "two infected areas", count_lesions=True)
    spread = np.full(SHAPE, 0.2, np.float32)
    done = stream(controller, rows((0, 2), (5, 7), (10, 12)), uncertainty=spread)
    labels = viewer.layers[LABELS_NAME]
    assert labels.data.shape == stack.data.shape and (labels.data[2] > 0).any() and not labels.data[:2].any()
    assert done.lesions.count == 3 and "3 lesions drawn, the prompt says 2" in done.notes
    assert labels.metadata["mris_runs"][1]["lesions"] == 3 and labels.metadata["mris_runs"][1]["stated_lesions"] == 2
    np.testing.assert_array_equal(viewer.layers[UNCERTAINTY_NAME].data[2], spread)


def test_bad_requests_are_refused_before_any_layer_changes(viewer) -> None:
    controller = LabelsController(viewer)
    with pytest.raises(PromptError, match="repeats finding 1"):
        controller.start(viewer.layers["slice"], ["a lung", "A lung"], SETTINGS)
    viewer.add_image(np.zeros((*SHAPE, 3), np.uint8), name="photo", rgb=True)
    with pytest.raises(UnsupportedImageError, match="RGB"):
        controller.start(viewer.layers["photo"], ["a lung"], SETTINGS)
    assert LABELS_NAME not in viewer.layers and not controller.active
