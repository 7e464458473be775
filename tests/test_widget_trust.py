"""The widget's side of the trust checks: the model's example prompts are offered, an out-of-domain image is
warned about in the status line while the segmentation still runs, ignored prompt words are named."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from _model_fixtures import ScriptedPipeline

from napari_mris._widget import LABELS_NAME, MRISWidget
from napari_mris.model_location import DEFAULT_MODEL_DIR
from napari_mris.prompt_check import PromptVocabulary

WAIT_MS = 30_000

pytestmark = pytest.mark.skipif(
    os.environ.get("QT_QPA_PLATFORM") == "offscreen" and not os.environ.get("DISPLAY"),
    reason="napari's canvas needs OpenGL: run the widget tests under xvfb-run (offscreen Qt has no GL here)",
)


class OutOfDomainPipeline(ScriptedPipeline):
    """Streams the scripted masks as a guarded model would for a slice it flags."""

    def stream(self, *args, **kwargs):
        note = "out of domain: the image looks unlike the chest X-rays the model was trained on (domain score 9 > 5)"
        for update in super().stream(*args, **kwargs):
            yield dataclasses.replace(
                update, domain_score=9.0, out_of_domain=True, warnings=(note, "ignored words ...: 'asdf'")
            )


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def test_examples_come_from_the_model_s_vocabulary(viewer) -> None:
    widget = MRISWidget(viewer)  # the default model: read without loading it
    vocabulary = PromptVocabulary.load(DEFAULT_MODEL_DIR)
    items = [widget.examples_combo.itemText(i) for i in range(widget.examples_combo.count())]
    assert items == list(vocabulary.examples) and widget.examples_combo.isEnabled()
    assert "side: bilateral, left, right, unilateral" in widget.prompt_edit.toolTip()
    widget._example_chosen(1)
    assert widget.prompt() == vocabulary.examples[1]


def test_a_model_without_vocabulary_offers_no_examples(viewer, tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    widget = MRISWidget(viewer, model=tmp_path)
    assert widget.examples_combo.count() == 0 and not widget.examples_combo.isEnabled()


def test_out_of_domain_is_warned_about_and_the_mask_still_drawn(viewer, qtbot) -> None:
    image = viewer.add_image(np.random.default_rng(0).random((30, 40)).astype(np.float32), name="noise")
    mask = np.zeros(image.data.shape, bool)
    mask[5:15, 10:30] = True
    widget = MRISWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MRIS")
    widget.set_pipeline(OutOfDomainPipeline([mask, mask]))
    widget.set_prompt("lower left lung asdf")
    widget.segment()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    status = widget.status_label.text()
    assert status.startswith("⚠ OUT OF DOMAIN") and "domain score 9 > 5" in status and "'asdf'" in status
    assert "Done: label 1" in status
    np.testing.assert_array_equal(viewer.layers[LABELS_NAME].data == 1, mask)  # the user's choice to go on
