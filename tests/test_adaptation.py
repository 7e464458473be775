"""The prompt-and-correct loop: save corrections, adapt with LoRA in a child process, switch, switch back."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from _model_fixtures import force_drawing

from napari_mris._widget import LABELS_NAME, MRISWidget
from napari_mris.adaptation import AdaptationError, AdaptationJob, adapter_name
from napari_mris.adapters import adapters_folder, list_adapters
from napari_mris.corrections import CorrectionsStore
from napari_mris.model.modeldir import model_hash
from napari_mris.pipeline import MRISPipeline

WAIT_MS = 240_000  # a child Python imports torch, transformers and peft on a shared 2-core CPU

needs_display = pytest.mark.skipif(
    os.environ.get("QT_QPA_PLATFORM") == "offscreen" and not os.environ.get("DISPLAY"),
    reason="napari's canvas needs OpenGL: run the widget tests under xvfb-run (offscreen Qt has no GL here)",
)


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the tiny model, with a private per-user adapters folder (the copy has the tiny
    model's hash, so a shared folder would show other tests' adapters)."""
    monkeypatch.setenv("NAPARI_MRIS_ADAPTERS", str(tmp_path / "user_adapters"))
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_adapting_needs_saved_examples(model_copy: Path, tmp_path: Path) -> None:
    job = AdaptationJob(model_copy, tmp_path / "empty", adapter_name())
    with pytest.raises(AdaptationError, match="No training examples"):
        list(job.run())
    with pytest.raises(AdaptationError, match="no trained decoder"):
        list(AdaptationJob(tmp_path, tmp_path, "x").run())


def test_adapter_names_sort_by_time() -> None:
    from datetime import datetime, timezone

    assert adapter_name(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)) == "corrections-20260102-030405"


@needs_display
def test_save_adapt_switch_and_switch_back(make_napari_viewer, qtbot, model_copy: Path, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    image = viewer.add_image(rng.random((32, 32)).astype(np.float32), name="slice")
    widget = MRISWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MRIS")
    widget.set_pipeline(MRISPipeline.from_pretrained(model_copy, device="cpu"))
    widget.corrections_root = tmp_path / "corrections"
    widget.adapt_steps = 3
    base_hash = model_hash(model_copy)

    for value, prompt in enumerate(("Unilateral pulmonary infection, lower left lung.", "upper right lung"), 1):
        widget.set_prompt(prompt)
        with force_drawing(widget.pipeline):  # the tiny model must draw something to be corrected
            widget.segment()
            qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
        labels = viewer.layers[LABELS_NAME]
        assert labels.metadata["mris_segment_labels"][value] == prompt
        corrected = np.zeros(image.data.shape, bool)
        corrected[20:28, 4 * value : 14 * value] = True
        labels.data_setitem(np.nonzero(corrected), value)  # the radiologist's correction
        labels.selected_label = value
        assert widget.save_example() is not None
    assert len(CorrectionsStore(widget.corrections_root)) == 2

    widget.adapt()
    assert widget.is_running and not widget.segment_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    assert widget.adapter is not None and widget.adapter.startswith("corrections-"), widget.status_label.text()
    assert (adapters_folder(model_copy) / widget.adapter / "adapter_model.safetensors").is_file()
    assert not (model_copy / "adapters").exists()  # the model directory is never written
    assert widget.adapter_combo.findData(widget.adapter) >= 0  # the widget lists this model's adapters
    assert widget.adapter in widget.model_label.text()
    assert model_hash(model_copy) == base_hash  # the base weights were not touched

    widget.set_prompt("lower left lung")
    widget.segment()  # loads base + adapter in a worker, then streams
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    assert widget.pipeline is not None and widget.pipeline.adapter == widget.adapter
    assert widget.status_label.text().startswith(("Done", "Not present")), widget.status_label.text()

    none_index = widget.adapter_combo.findData(None)
    widget.adapter_combo.setCurrentIndex(none_index)
    widget.adapter_combo.activated.emit(none_index)  # the user picks "none": back to the base model
    assert widget.adapter is None and widget.pipeline is None


@needs_display
def test_stopping_an_adaptation_leaves_the_model_unchanged(make_napari_viewer, qtbot, model_copy, tmp_path) -> None:
    viewer = make_napari_viewer()
    widget = MRISWidget(viewer, model=model_copy)
    store = CorrectionsStore(tmp_path / "corrections")
    mask = np.zeros((32, 32), bool)
    mask[4:12, 4:12] = True
    store.add(np.arange(32 * 32, dtype=np.float32).reshape(32, 32), "lower left lung", mask)
    widget.corrections_root = store.root
    widget.adapt_steps = 100_000
    widget.adapt()
    qtbot.waitUntil(lambda: widget.status_label.text().startswith("Adapting: step"), timeout=WAIT_MS)
    widget.stop()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    assert "stopped" in widget.status_label.text() and widget.adapter is None
    assert not list_adapters(model_copy) and not (model_copy / "adapters").exists()
