"""The docked widget renders: a streamed mask shows up on napari's canvas in its label colour.

Runs under `xvfb-run` (napari's canvas needs OpenGL). With `MRIS_SAVE_SCREENSHOT=1` the whole window is
saved as `docs/img/widget.png` for the user guide. The mask comes from `ScriptedPipeline` (the phantom's
reference mask streamed through the widget), so the picture shows the widget, not a model's accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _model_fixtures import ScriptedPipeline

from napari_mris._widget import LABELS_NAME, MRISWidget
from napari_mris.phantom import make_phantom

DOCS_IMAGE = Path(__file__).resolve().parents[1] / "docs" / "img" / "widget.png"

pytestmark = pytest.mark.skipif(
    os.environ.get("QT_QPA_PLATFORM") == "offscreen" and not os.environ.get("DISPLAY"),
    reason="napari's canvas needs OpenGL: run under xvfb-run",
)


def colour_pixels(shot: np.ndarray, rgb: np.ndarray, tolerance: int = 3) -> int:
    return int((np.abs(shot[..., :3].astype(int) - rgb).max(axis=-1) <= tolerance).sum())


def test_docked_widget_shows_the_mask_on_the_canvas(make_napari_viewer, qtbot) -> None:
    phantom = make_phantom(7, size=224)
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1280, 800)
    viewer.add_image(phantom.image, name="phantom chest X-ray")
    widget = MRISWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MRIS", area="right")
    widget.set_pipeline(ScriptedPipeline([phantom.mask]))
    widget.set_prompt(phantom.description)
    widget.segment()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=30_000)
    labels = viewer.layers[LABELS_NAME]
    viewer.reset_view()

    labels.opacity = 1.0  # the label colour lands on the canvas unblended
    rgb = np.round(np.asarray(labels.get_color(1))[:3] * 255).astype(int)
    shown = colour_pixels(viewer.screenshot(canvas_only=True, flash=False), rgb)
    expected = phantom.mask.sum() * viewer.camera.zoom**2  # mask pixels times the canvas pixels per image pixel
    assert 0.6 * expected < shown < 1.4 * expected, (shown, expected)
    labels.visible = False
    assert colour_pixels(viewer.screenshot(canvas_only=True, flash=False), rgb) < 0.05 * shown

    if os.environ.get("MRIS_SAVE_SCREENSHOT") == "1":
        labels.visible = True
        labels.opacity = 0.6
        window = viewer.screenshot(canvas_only=False, flash=False)
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(window).save(DOCS_IMAGE)
