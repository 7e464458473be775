"""The MRIS dock widget: type a finding, watch the mask grow, stop, correct, export, save as an example.

The dock is layout, buttons and status; the work is composed from parts that own one job each:

- `_labels_controller.LabelsController` draws the streamed masks into the Labels layer (label values,
  undo steps, taking a drawing back, what is recorded on the layer); it has no Qt widget in it;
- `_corrections_panel.CorrectionsPanel` saves corrected masks as training examples and adapts the model;
- `model_location` says what the chosen model is, without importing torch.

Threading: the model loads and decodes in napari workers (`create_worker`, with napari's progress for the
load); every update is handed to the controller in the main thread (the `yielded` signal), so napari stays
responsive. Several findings (one per line of the prompt box) are one worker (`pipeline.stream_findings`,
the image read once) drawn in turn; Stop keeps the findings already drawn and the current one's partial
mask, and starts none of the rest.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import create_widget
from napari.layers import Image, Layer
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_mris._corrections_panel import CorrectionsPanel
from napari_mris._labels_controller import (
    LABELS_NAME,
    UNCERTAINTY_NAME,
    FindingDone,
    LabelsController,
    mris_labels_layer,
    source_window,
)
from napari_mris.errors import MRISError, user_message
from napari_mris.findings import split_findings
from napari_mris.model_location import model_path, model_problem, peek_config
from napari_mris.prompt_check import PromptVocabulary

if TYPE_CHECKING:
    import napari
    from napari.layers import Labels

    from napari_mris.corrections import CorrectionRecord
    from napari_mris.pipeline import MRISPipeline, StreamUpdate

__all__ = ["LABELS_NAME", "UNCERTAINTY_NAME", "MRISWidget"]  # the layer names, for scripts and tests

ORDERS = (("Coarse-to-fine", "scale"), ("Raster", "raster"))
EXPORT_FILTERS = "PNG (*.png);;NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd);;MetaImage (*.mha);;DICOM SEG (*.dcm)"
MAX_HISTORY = 20


class _Canceller:
    """Stops a worker from any thread; held apart from the widget so it still works while Qt deletes the widget."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.worker = None

    def cancel(self, *_: Any) -> None:
        self.event.set()
        if self.worker is not None:
            self.worker.quit()


class MRISWidget(QWidget):
    """Plugins > MRIS: referring segmentation of the selected image layer."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, model: str | Path = "default") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.model: str | Path = model
        self.adapter: str | None = None
        self.new_adapter: str | None = None  # the adapter trained last, shown until the user picks an adapter
        self.controller = LabelsController(napari_viewer)
        self.corrections = CorrectionsPanel(
            napari_viewer, model_dir=lambda: model_path(self.model), image=self.image_layer
        )
        self._pipeline: MRISPipeline | None = None
        self._loader = None
        self._canceller = _Canceller()
        self._build()
        self._connect()
        self.refresh_layers()
        self._show_model()
        self._use_model_default_order()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.model_button = QPushButton("Model…")
        self.model_button.setToolTip("Choose a model directory (config.json + safetensors files)")
        self.adapter_combo = QComboBox()
        self.adapter_combo.setToolTip("LoRA adapters of this model, from your corrections (your adapters folder)")
        self.adapter_effect = QLabel()  # the adapter's Dice against the base model's on held-back corrections
        self.adapter_effect.setWordWrap(True)
        # magicgui's napari layer type: a picker of Image layers, its choices from `_image_choices`
        self.image_picker = create_widget(annotation=Image, label="Image")
        self.image_picker.choices = self._image_choices
        self.prompt_edit = QPlainTextEdit()
        self.prompt_edit.setPlaceholderText(
            "Describe the finding, e.g. 'Bilateral pulmonary infection, lower left lung'; "
            "several findings: one per line, one label each"
        )
        self.prompt_edit.setFixedHeight(72)
        self.history_combo = QComboBox()
        self.history_combo.setPlaceholderText("Previous prompts")
        self.examples_combo = QComboBox()  # the model's training descriptions (prompt_vocabulary.json)
        self.examples_combo.setPlaceholderText("Prompts this model was trained on")
        self.order_combo = QComboBox()
        for text, order in ORDERS:
            self.order_combo.addItem(text, order)
        self.samples_spin = QSpinBox()
        self.samples_spin.setRange(1, 16)
        self.samples_spin.setToolTip("More than 1: consensus of sampled masks plus an uncertainty layer")
        self.lesions_check = QCheckBox("Count lesions")
        self.lesions_check.setToolTip(
            "Split each finished mask into its connected lesions and compare their number with the prompt's "
            "('two infected areas'); a difference is reported, the mask is never changed for it"
        )
        self.segment_button = QPushButton("Segment")
        self.stop_button = QPushButton("Stop")
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        self.status_label = QLabel("Ready")
        self.status_label.setWordWrap(True)
        # wrap long messages instead of widening the dock, which would narrow the canvas under the image
        self.status_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.export_button = QPushButton("Export…")

        model_row = QHBoxLayout()
        model_row.addWidget(self.model_label, 1)
        model_row.addWidget(self.model_button)
        run_row = QHBoxLayout()
        run_row.addWidget(self.segment_button)
        run_row.addWidget(self.stop_button)
        form = QFormLayout()
        form.addRow("Adapter", self.adapter_combo)
        form.addRow("", self.adapter_effect)
        form.addRow("Image", self.image_picker.native)
        form.addRow("Prompt", self.prompt_edit)
        form.addRow("History", self.history_combo)
        form.addRow("Examples", self.examples_combo)
        form.addRow("Order", self.order_combo)
        form.addRow("Samples", self.samples_spin)
        form.addRow("", self.lesions_check)
        self.setMaximumWidth(480)  # a dock beside the canvas, not a second main window
        layout = QVBoxLayout(self)
        layout.addLayout(model_row)
        layout.addLayout(form)
        layout.addLayout(run_row)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(self.export_button)
        layout.addWidget(self.corrections)
        layout.addStretch(1)
        for combo in self.findChildren(QComboBox):  # long prompts and layer names must not widen the dock either
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(16)

    def _connect(self) -> None:
        self.segment_button.clicked.connect(self.segment)
        self.stop_button.clicked.connect(self.stop)
        self.export_button.clicked.connect(self._export_dialog)
        self.model_button.clicked.connect(self._model_dialog)
        self.adapter_combo.activated.connect(self._adapter_chosen)
        self.adapter_combo.highlighted.connect(self._adapter_highlighted)
        self.history_combo.activated.connect(self._history_chosen)
        self.examples_combo.activated.connect(self._example_chosen)
        self.prompt_edit.textChanged.connect(self._update_buttons)
        self.image_picker.changed.connect(self._update_buttons)
        self.corrections.status.connect(self._status)
        self.corrections.failed.connect(self._fail)
        self.corrections.progress.connect(self.progress_bar.setValue)
        self.corrections.busy_changed.connect(self._update_buttons)
        self.corrections.adapted.connect(self._on_adapted)
        self.viewer.layers.events.inserted.connect(self.refresh_layers)
        self.viewer.layers.events.removed.connect(self._layer_removed)
        self.destroyed.connect(self._canceller.cancel)

    # ------------------------------------------------------------------ state shown in the widget

    @property
    def is_running(self) -> bool:
        return self._canceller.worker is not None or self._loader is not None or self.corrections.busy

    def prompt(self) -> str:
        return " ".join(self.prompt_edit.toPlainText().split())

    def findings(self) -> list[str]:
        """The prompt box's findings, one per line (blank lines inside kept, for `check_findings` to name)."""
        return [" ".join(line.split()) for line in split_findings(self.prompt_edit.toPlainText())]

    def set_prompt(self, text: str) -> None:
        self.prompt_edit.setPlainText(text)

    def image_layer(self) -> Image | None:
        return self.image_picker.value

    def _image_choices(self, _picker: Any) -> list[tuple[str, Image]]:
        """The viewer's image layers, but the uncertainty map this widget adds (never an input)."""
        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, Image) and layer.name != UNCERTAINTY_NAME
        ]

    def refresh_layers(self, event: Any = None) -> None:
        """Refill the image picker, keeping the current choice when it still exists, else the newest image."""
        current = self.image_picker.current_choice
        self.image_picker.reset_choices()
        names = [name for name, _ in self._image_choices(self.image_picker)]
        if names and current not in names:
            self.image_picker.native.setCurrentIndex(self.image_picker.native.findText(names[-1]))
        inserted = getattr(event, "value", None)
        if isinstance(inserted, Layer):  # a renamed layer keeps its place under its new name
            inserted.events.name.connect(self.refresh_layers)
        self._update_buttons()

    def _layer_removed(self, event: Any) -> None:
        if self.controller.release(event.value):
            self._canceller.cancel()
            self._status(f"Stopped: layer {event.value.name!r} was removed")
        self.refresh_layers()

    def _update_buttons(self) -> None:
        busy = self.is_running
        self.segment_button.setEnabled(not busy and bool(self.prompt()) and self.image_layer() is not None)
        self.stop_button.setEnabled(busy)
        self.model_button.setEnabled(not busy)
        self.adapter_combo.setEnabled(not busy)
        self.corrections.set_can_adapt(not busy)

    def _status(self, text: str) -> None:
        self.status_label.setText(text)

    def _fail(self, message: str) -> None:
        self._status(message)
        show_error(message)

    def _show_model(self) -> None:
        if self._pipeline is not None:
            p = self._pipeline
            text = f"Model: {p.model_id} ({p.model_hash[:8]}) on {p.device}"
        else:
            text = f"Model: {self.model} (loads on first Segment)"
        self.model_label.setText(text + (f" + adapter {self.adapter}" if self.adapter else ""))
        self.adapter_combo.blockSignals(True)
        self.adapter_combo.clear()
        self.adapter_combo.addItem("none", None)
        for name in _adapters(self.model):
            self.adapter_combo.addItem(name, name)
            self.adapter_combo.setItemData(self.adapter_combo.count() - 1, self._effect(name), Qt.ToolTipRole)
        index = self.adapter_combo.findData(self.adapter)
        self.adapter_combo.setCurrentIndex(max(index, 0))
        self.adapter_combo.blockSignals(False)
        self._show_effect(self.adapter or self.new_adapter)
        self._show_vocabulary()

    def _show_vocabulary(self) -> None:
        """Offer the model's example prompts and list its words in the prompt box's tooltip."""
        vocabulary = _vocabulary(self.model)
        self.examples_combo.clear()
        if vocabulary is None:
            self.examples_combo.setEnabled(False)
            self.prompt_edit.setToolTip("")
            return
        self.examples_combo.addItems(list(vocabulary.examples))
        self.examples_combo.setCurrentIndex(-1)
        self.examples_combo.setEnabled(bool(vocabulary.examples))
        self.prompt_edit.setToolTip(f"The model was trained on descriptions using these words: {vocabulary.summary()}")

    def _use_model_default_order(self) -> None:
        """Select the model's preferred order, when a model is chosen (never over a choice made since)."""
        order = peek_config(self.model).get("default_order")
        if order is not None:
            self.order_combo.setCurrentIndex(max(self.order_combo.findData(order), 0))

    # ------------------------------------------------------------------ model choice

    def set_model(self, model: str | Path, adapter: str | None = None) -> None:
        """Use another model directory (or adapter); it loads on the next Segment."""
        if self.is_running:
            self._fail("Wait for the running segmentation to finish (or press Stop) before changing the model")
            return
        self.model, self.adapter, self._pipeline = model, adapter, None
        self._show_model()
        self._use_model_default_order()

    def set_pipeline(self, pipeline: MRISPipeline) -> None:
        """Use a pipeline that is already loaded (scripts, notebooks, tests) instead of loading `self.model`."""
        if self.is_running:
            self._fail("Wait for the running segmentation to finish (or press Stop) before changing the model")
            return
        self.model, self.adapter, self._pipeline = pipeline.model_dir, pipeline.adapter, pipeline
        self._show_model()
        self._use_model_default_order()

    @property
    def pipeline(self) -> MRISPipeline | None:
        """The loaded pipeline, or None before the first Segment."""
        return self._pipeline

    def _model_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a napari-mris model directory")
        if folder:
            self.set_model(Path(folder))
            problem = model_problem(folder)  # said now, not only at the next Segment
            if problem is not None:
                self._fail(problem)

    def _adapter_chosen(self, index: int) -> None:
        self.new_adapter = None
        self.set_model(self.model, self.adapter_combo.itemData(index))

    def _adapter_highlighted(self, index: int) -> None:
        """An adapter under the pointer in the open list: its effect, before the user switches to it."""
        self._show_effect(self.adapter_combo.itemData(index) or self.adapter or self.new_adapter)

    def _effect(self, name: str) -> str:
        from napari_mris.adaptation import adapter_effect

        return adapter_effect(model_path(self.model), name)

    def _show_effect(self, name: str | None) -> None:
        text = self._effect(name) if name else ""
        self.adapter_effect.setText(text)
        self.adapter_effect.setVisible(bool(text))

    def _history_chosen(self, index: int) -> None:
        if index >= 0:
            self.set_prompt(self.history_combo.itemText(index))

    def _example_chosen(self, index: int) -> None:
        if index >= 0:
            self.set_prompt(self.examples_combo.itemText(index))

    def _remember(self, prompt: str) -> None:
        items = [prompt] + [self.history_combo.itemText(i) for i in range(self.history_combo.count())]
        items = list(dict.fromkeys(items))[:MAX_HISTORY]
        self.history_combo.blockSignals(True)
        self.history_combo.clear()
        self.history_combo.addItems(items)
        self.history_combo.setCurrentIndex(-1)
        self.history_combo.blockSignals(False)

    # ------------------------------------------------------------------ segmentation

    def segment(self) -> None:
        """Start a segmentation of the current plane of the selected image with the typed prompt."""
        if self.is_running:
            return
        try:
            if not self.prompt():
                raise MRISError("Type a prompt describing the finding first")
            image = self.image_layer()
            if image is None:
                raise MRISError("Open an image first (File > Open, or File > Open Sample > napari-mris)")
            settings = {"order": self.order_combo.currentData(), "samples": self.samples_spin.value()}
            self.controller.start(image, self.findings(), settings, count_lesions=self.lesions_check.isChecked())
        except MRISError as exc:
            self._fail(str(exc))
            return
        self._remember("\n".join(self.controller.prompts()))
        self.progress_bar.setValue(0)
        if self._pipeline is None:
            self._load_model()
        else:
            self._start_stream()
        self._update_buttons()

    def _load_model(self) -> None:
        self._status(f"Loading model {self.model} …")
        from napari_mris.pipeline import MRISPipeline  # torch is imported on first use, not with the widget

        worker = create_worker(
            MRISPipeline.from_pretrained,
            self.model,
            device="auto",
            adapter=self.adapter,
            _progress={"desc": "Loading the MRIS model"},
            _ignore_errors=True,
        )
        worker.returned.connect(self._model_loaded)
        worker.errored.connect(self._model_failed)
        worker.finished.connect(self._loader_finished)
        self._loader = worker
        worker.start()

    def _model_loaded(self, pipeline: MRISPipeline) -> None:
        self._pipeline = pipeline
        self._show_model()
        if self.controller.active:  # not when Stop was pressed while loading: keep the model, draw nothing
            self._start_stream()

    def _model_failed(self, exc: Exception) -> None:
        self.controller.abort()
        self._fail(user_message(exc, "Could not load the model"))

    def _loader_finished(self) -> None:
        self._loader = None
        self._update_buttons()

    def _start_stream(self) -> None:
        run = self.controller.run
        pixels = np.asarray(run.image.data[run.plane], dtype=np.float32)
        self._canceller = _Canceller()
        self.destroyed.connect(self._canceller.cancel)
        worker = create_worker(
            _stream_job,
            self._pipeline,
            pixels,
            self.controller.prompts(),
            run.settings,
            source_window(run.image),
            self._canceller.event,
            _ignore_errors=True,
        )
        worker.yielded.connect(self._on_update)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_worker_finished)
        self._canceller.worker = worker
        self.controller.stream_started(self._pipeline)
        self._status(f"Segmenting {self.controller.which()}“{_short(run.prompt)}” …")
        worker.start()

    def stop(self) -> None:
        """Cancel at once: the partial mask drawn so far is kept as one undo step."""
        if self.corrections.stop():
            return
        self._canceller.cancel()
        stopped = self.controller.stop()
        if stopped is None:
            return
        run, rest = stopped.run, stopped.skipped
        done = run.last.progress if run.last is not None else 0.0
        note = "the partial mask is kept (Ctrl+Z removes it)" if stopped.kept else "nothing was drawn"
        skipped = f"; {rest} later finding{'s' if rest != 1 else ''} not started" if rest else ""
        self._status(f"Stopped at {done:.0%} of label {run.value}: {note}{skipped}")

    def _on_update(self, item: tuple[int, StreamUpdate]) -> None:
        index, update = item
        run = self.controller.current(index)
        if run is None:  # stopped or superseded: updates still queued are dropped
            return
        first = run.last is None
        self.controller.draw(run, update)
        self.progress_bar.setValue(round(100 * update.progress))
        timings = update.timings
        if first and update.out_of_domain:  # warn once; the run goes on (Stop ends it)
            show_warning(f"MRIS: {_out_of_domain_note(update)}")
        self._status(
            _domain_prefix(update)
            + self.controller.which()
            + f"{update.tokens_done}/{update.tokens_total} tokens · {timings.get('tokens_per_s', 0):.0f} tokens/s · "
            f"{timings.get('total_s', 0):.2f} s"
        )
        if update.finished:
            self._show_finished(self.controller.finish(update))
            if self.controller.next_finding(run) is not None:
                self.progress_bar.setValue(0)

    def _show_finished(self, done: FindingDone) -> None:
        run, update, notes = done.run, done.update, done.notes
        if update.not_present:
            how = "the model answered not present" if update.rejected else "the model drew no lesion"
            finding = _short(run.prompt, 80)
            message = f"Not present: no lesion found for “{finding}” ({how}; label {run.value} unchanged)"
            self._status(message + (f" ({notes})" if notes else ""))
            show_info(message)
            return
        seconds = update.timings.get("total_s", 0.0)
        others = done.kept_by_others
        drawn = f"{done.held} pixels" + (f" ({others} of its mask kept by other labels)" if others else "")
        drawn += f", {done.lesions.count} lesion(s)" if done.lesions is not None else ""
        text = _domain_prefix(update) + f"Done: label {run.value}, {drawn}, {seconds:.2f} s"
        self._status(text + (f" ({notes})" if notes else ""))

    def _on_error(self, exc: Exception) -> None:
        self.controller.abort()  # the findings already drawn stay
        self._fail(user_message(exc, "Segmentation failed"))

    def _on_worker_finished(self) -> None:
        self.controller.stream_ended()
        self._canceller.worker = None
        self._update_buttons()

    # ------------------------------------------------------------------ export and corrections

    def labels_layer(self) -> Labels | None:
        """The MRIS Labels layer to export: the selected one if it is an MRIS layer, else the image's."""
        return mris_labels_layer(self.viewer, self.image_layer())

    def export_to(self, path: str | Path) -> tuple[Path, Path] | None:
        """Write the MRIS labels (format from the extension) and a JSON sidecar; errors go to the status line."""
        from napari_mris.export import export_labels

        labels = self.labels_layer()
        if labels is None:
            self._fail("Nothing to export yet: run a segmentation (or paint in an MRIS layer) first")
            return None
        try:
            written = export_labels(
                path,
                np.asarray(labels.data),
                labels.metadata["mris_slice"],
                labels.metadata.get("mris_runs", {}),
                image_name=labels.metadata.get("mris_image", ""),
            )
        except MRISError as exc:
            self._fail(str(exc))
            return None
        self._status(f"Exported {written[0].name} and {written[1].name}")
        return written

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export MRIS labels", "mris_labels.nii.gz", EXPORT_FILTERS)
        if path:
            self.export_to(path)

    def save_example(self) -> CorrectionRecord | None:
        """Add (current plane, prompt, corrected mask, model's prediction) to the corrections store."""
        return self.corrections.save_example()

    def adapt(self) -> None:
        """Fine-tune a LoRA adapter on the corrections store in a child process; list it with its effect."""
        if not self.is_running:
            self.corrections.adapt()

    def _on_adapted(self, name: str) -> None:
        """List the new adapter with its held-back comparison; the user switches to it (or not) under Adapter."""
        self.new_adapter = name
        self._show_model()
        self._status(f"Adapted: new adapter {name}; choose it under Adapter to use it")


# ---------------------------------------------------------------------- helpers


def _stream_job(pipeline, pixels, prompts, settings, window, stop: threading.Event):
    """The worker's generator: (finding index, update) of the pipeline's stream of findings, polled for the
    stop flag between decoding steps."""
    yield from pipeline.stream_findings(pixels, prompts, window=window, should_stop=stop.is_set, **settings)


def _vocabulary(model: str | Path) -> PromptVocabulary | None:
    """The model's prompt vocabulary, read without loading torch (None: none recorded, or unreadable, which
    loading the model reports)."""
    try:
        return PromptVocabulary.load(model_path(model))
    except MRISError:
        return None


def _adapters(model: str | Path) -> list[str]:
    """The adapters of this model in the user's adapters folder ([] when the model cannot be read yet)."""
    from napari_mris.adapters import list_adapters

    try:
        return list_adapters(model_path(model))
    except (MRISError, OSError):  # a missing or damaged model directory: the load reports it in plain words
        return []


def _out_of_domain_note(update: StreamUpdate) -> str:
    return next((note for note in update.warnings if note.startswith("out of domain")), "out of domain")


def _domain_prefix(update: StreamUpdate) -> str:
    """'⚠ OUT OF DOMAIN · ' for a slice the model's domain guard flags, else nothing."""
    return "⚠ OUT OF DOMAIN (mask likely meaningless) · " if update.out_of_domain else ""


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
