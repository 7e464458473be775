"""The corrections section of the MRIS dock: save a corrected mask as a training example, adapt to them.

Its own widget, apart from the dock's segmentation controls, so that everything about the user's
corrections and the adapters trained on them (and what the correction loop shows about them) has one home.
It reaches the dock only through its signals and the two callables it is given.

Adapting runs `napari_mris_train` in a child process (`adaptation.AdaptationJob`) inside a napari worker,
with the dock's progress bar and Stop; the base model is never changed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from napari.qt.threading import create_worker
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QPushButton, QVBoxLayout, QWidget

from napari_mris._labels_controller import mris_labels_layer, plane_of, source_window
from napari_mris.errors import MRISError, user_message

if TYPE_CHECKING:
    import napari
    from napari.layers import Image

    from napari_mris.corrections import CorrectionRecord

DEFAULT_ADAPT_STEPS: int | None = None  # None: the fine-tuning recipe's own number of steps


class CorrectionsPanel(QWidget):
    """The buttons "Save as training example" and "Adapt model to my corrections", and their work."""

    status = Signal(str)  # a line for the dock's status label
    failed = Signal(str)  # an error for the status label and a notification
    progress = Signal(int)  # 0..100, for the dock's progress bar
    busy_changed = Signal()  # an adaptation started or ended
    adapted = Signal(str)  # the name of the adapter just trained, for the dock to list with its effect

    def __init__(
        self, viewer: napari.viewer.Viewer, model_dir: Callable[[], Path], image: Callable[[], Image | None]
    ) -> None:
        super().__init__()
        self.viewer = viewer
        self._model_dir = model_dir  # the directory of the dock's current model
        self._image = image  # the dock's selected image layer
        self.root: Path | None = None  # None: the default store (~/.napari-mris/corrections)
        self.replay_data: Path | None = None  # LViT root replayed while adapting; None: synthetic phantoms
        self.steps = DEFAULT_ADAPT_STEPS
        self._job = None  # the running AdaptationJob
        self.save_example_button = QPushButton("Save as training example")
        self.adapt_button = QPushButton("Adapt model to my corrections")
        self.adapt_button.setToolTip(
            "LoRA fine-tuning on the saved training examples (plus a replay sample), as a new adapter; "
            "the base model is never changed, and Adapter > none switches back"
        )
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.save_example_button)
        layout.addWidget(self.adapt_button)
        self.save_example_button.clicked.connect(self.save_example)
        self.adapt_button.clicked.connect(self.adapt)

    @property
    def busy(self) -> bool:
        return self._job is not None

    def set_can_adapt(self, enabled: bool) -> None:
        """Adapting is off while the dock loads a model or segments."""
        self.adapt_button.setEnabled(enabled)

    def save_example(self) -> CorrectionRecord | None:
        """Add (current plane, prompt, corrected mask, model's prediction) to the corrections store."""
        from napari_mris.corrections import CorrectionsStore

        labels = mris_labels_layer(self.viewer, self._image())
        names = labels.metadata.get("mris_segment_labels", {}) if labels is not None else {}
        value = labels.selected_label if labels is not None else 0
        if value not in names:
            value = max(names, default=0)
        if labels is None or value not in names:
            self.failed.emit("Nothing to save yet: run a segmentation first, then correct it with the paint tools")
            return None
        image = next((layer for layer in self.viewer.layers if layer.name == labels.metadata.get("mris_image")), None)
        if image is None:
            self.failed.emit("The image of this MRIS layer was closed; cannot save the example without it")
            return None
        prediction = labels.metadata.get("mris_predictions", {}).get(value)
        plane = prediction["plane"] if prediction is not None else plane_of(self.viewer, image)
        source = labels.metadata["mris_slice"]
        run = labels.metadata.get("mris_runs", {}).get(value, {})
        try:
            record = CorrectionsStore(self.root).add(
                np.asarray(image.data[plane]),
                names[value],
                np.asarray(labels.data[plane]) == value,
                prediction=prediction["mask"] if prediction is not None else None,
                window=source_window(image),
                spacing=tuple(source.spacing[-2:]),
                model_id=run.get("model_id"),
                model_hash=run.get("model_hash"),
            )
        except (MRISError, OSError) as exc:
            self.failed.emit(f"Could not save the training example: {exc}")
            return None
        self.status.emit(f"Saved training example {record.name} (label {value})")
        return record

    def adapt(self) -> None:
        """Fine-tune a LoRA adapter on the corrections store in a child process; `adapted` names it."""
        from napari_mris.adaptation import AdaptationJob, adapter_name
        from napari_mris.corrections import CorrectionsStore

        if self.busy:
            return
        model_dir = self._model_dir()
        store = CorrectionsStore(self.root)
        job = AdaptationJob(model_dir, store.root, adapter_name(), self.steps, self.replay_data)
        worker = create_worker(job.run, _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_adapted)
        worker.errored.connect(lambda exc: self.failed.emit(user_message(exc, "Adaptation failed")))
        worker.finished.connect(self._on_finished)
        self.destroyed.connect(job.stop)  # closing napari mid-run ends the child too
        self._job = job
        self.progress.emit(0)
        self.status.emit(f"Adapting {model_dir.name} to {len(store)} saved example(s) …")
        self.busy_changed.emit()
        worker.start()

    def stop(self) -> bool:
        """Stop a running adaptation (the model stays as it was); False when none runs."""
        if self._job is None:
            return False
        self._job.stop()
        return True

    def _on_progress(self, progress) -> None:
        self.progress.emit(round(100 * progress.step / max(progress.total, 1)))
        if progress.phase == "held-back":
            self.status.emit(
                f"Adapting: comparing with the base model on held-back corrections, {progress.step}/{progress.total}"
            )
        else:
            self.status.emit(f"Adapting: step {progress.step}/{progress.total}, loss {progress.loss:.3f}")

    def _on_adapted(self, name: str) -> None:
        self._job = None  # before `adapted`: the dock switches models only when nothing runs
        self.adapted.emit(name)

    def _on_finished(self) -> None:
        self._job = None
        self.busy_changed.emit()
