"""The MRIS dock widget: type a finding, watch the mask grow, stop, correct, export, save as an example.

Threading: the model loads and decodes in napari `thread_worker`s; every update is written to the Labels
layer in the main thread (the `yielded` signal), so napari stays responsive.

Labels and undo: one Labels layer ("MRIS") per image, one label value per prompt, the prompt stored in
`layer.metadata["mris_segment_labels"]` and `layer.features`. While the model streams, partial masks are
drawn straight into the layer (no history) and the layer is locked for painting; when the run ends, the
drawing is replayed through `layer.data_setitem` as ONE history item, so a single Ctrl+Z removes a whole
segmentation. A run only writes pixels that are 0 or already hold its own label value, never a label the
user painted for another finding. Stop keeps what was drawn so far (as one undo step); an error removes it.

Several findings (one per line of the prompt box) are one worker (`pipeline.stream_findings`, the image
read once) and one run per finding, in turn: each finding gets its own label and its own undo step; Stop
keeps the findings already drawn and the current one's partial mask, and starts none of the rest.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
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

from napari_mris.errors import MRISError, UnsupportedImageError
from napari_mris.findings import check_findings, instances, split_findings
from napari_mris.io.slice import Slice
from napari_mris.prompt_check import PromptVocabulary

if TYPE_CHECKING:
    import napari

    from napari_mris.pipeline import MRISPipeline, StreamUpdate

log = logging.getLogger(__name__)

LABELS_NAME = "MRIS"
UNCERTAINTY_NAME = "MRIS uncertainty"
ORDERS = (("Coarse-to-fine", "scale"), ("Raster", "raster"))
EXPORT_FILTERS = "PNG (*.png);;NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd);;MetaImage (*.mha);;DICOM SEG (*.dcm)"
MAX_HISTORY = 20
DEFAULT_ADAPT_STEPS = 200
DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"  # = pipeline.DEFAULT_MODEL_DIR, without torch


@dataclass
class _Run:
    """One segmentation in progress: where it draws and what the plane looked like before."""

    image: Image
    labels: Labels
    value: int
    plane: tuple[int, ...]  # () for a 2D image, (z,) for a plane of a stack
    prompt: str
    settings: dict[str, Any]
    before: np.ndarray  # the labels plane when the run started
    drawn: np.ndarray = field(init=False)  # pixels this run has written at least once
    last: StreamUpdate | None = None
    index: int = 0  # which finding of the worker's list this run draws
    count_lesions: bool = False  # set the finished mask's lesions against the count in the prompt

    def __post_init__(self) -> None:
        self.drawn = np.zeros(self.before.shape, bool)


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
        self.corrections_root: Path | None = None  # None: the default store (~/.napari-mris/corrections)
        self.replay_data: Path | None = None  # LViT root replayed while adapting; None: synthetic phantoms
        self.adapt_steps = DEFAULT_ADAPT_STEPS
        self._adaptation = None  # the running AdaptationJob
        self._pipeline: MRISPipeline | None = None
        self._loader = None
        self._run: _Run | None = None
        self._pending: list[tuple[int, int, str]] = []  # (index, label value, prompt) of findings still to come
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
        self.image_combo = QComboBox()
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
        self.save_example_button = QPushButton("Save as training example")
        self.adapt_button = QPushButton("Adapt model to my corrections")
        self.adapt_button.setToolTip(
            "LoRA fine-tuning on the saved training examples (plus a replay sample), as a new adapter; "
            "the base model is never changed, and Adapter > none switches back"
        )

        model_row = QHBoxLayout()
        model_row.addWidget(self.model_label, 1)
        model_row.addWidget(self.model_button)
        run_row = QHBoxLayout()
        run_row.addWidget(self.segment_button)
        run_row.addWidget(self.stop_button)
        out_row = QHBoxLayout()
        out_row.addWidget(self.export_button)
        out_row.addWidget(self.save_example_button)
        form = QFormLayout()
        form.addRow("Adapter", self.adapter_combo)
        form.addRow("Image", self.image_combo)
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
        layout.addLayout(out_row)
        layout.addWidget(self.adapt_button)
        layout.addStretch(1)
        for combo in self.findChildren(QComboBox):  # long prompts and layer names must not widen the dock either
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(16)

    def _connect(self) -> None:
        self.segment_button.clicked.connect(self.segment)
        self.stop_button.clicked.connect(self.stop)
        self.export_button.clicked.connect(self._export_dialog)
        self.save_example_button.clicked.connect(self.save_example)
        self.adapt_button.clicked.connect(self.adapt)
        self.model_button.clicked.connect(self._model_dialog)
        self.adapter_combo.activated.connect(self._adapter_chosen)
        self.history_combo.activated.connect(self._history_chosen)
        self.examples_combo.activated.connect(self._example_chosen)
        self.prompt_edit.textChanged.connect(self._update_buttons)
        self.image_combo.currentIndexChanged.connect(self._update_buttons)
        self.viewer.layers.events.inserted.connect(self.refresh_layers)
        self.viewer.layers.events.removed.connect(self._layer_removed)
        self.destroyed.connect(self._canceller.cancel)

    # ------------------------------------------------------------------ state shown in the widget

    @property
    def is_running(self) -> bool:
        return self._canceller.worker is not None or self._loader is not None or self._adaptation is not None

    def prompt(self) -> str:
        return " ".join(self.prompt_edit.toPlainText().split())

    def findings(self) -> list[str]:
        """The prompt box's findings, one per line (blank lines inside kept, for `check_findings` to name)."""
        return [" ".join(line.split()) for line in split_findings(self.prompt_edit.toPlainText())]

    def set_prompt(self, text: str) -> None:
        self.prompt_edit.setPlainText(text)

    def image_layer(self) -> Image | None:
        name = self.image_combo.currentText()
        return next((layer for layer in self.viewer.layers if layer.name == name and isinstance(layer, Image)), None)

    def refresh_layers(self, event: Any = None) -> None:
        """Refill the image picker, keeping the current choice when it still exists."""
        current = self.image_combo.currentText()
        names = [
            layer.name for layer in self.viewer.layers if isinstance(layer, Image) and layer.name != UNCERTAINTY_NAME
        ]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        elif names:
            self.image_combo.setCurrentIndex(len(names) - 1)
        self.image_combo.blockSignals(False)
        if event is not None and getattr(event, "value", None) is not None:
            event.value.events.name.connect(self.refresh_layers)
        self._update_buttons()

    def _layer_removed(self, event: Any) -> None:
        run = self._run
        if run is not None and event.value in (run.image, run.labels):
            self._canceller.cancel()
            self._run, self._pending = None, []
            if event.value is run.image:  # the labels stay: keep what was drawn and unlock them
                self._commit(run)
            self._status(f"Stopped: layer {event.value.name!r} was removed")
        self.refresh_layers()

    def _update_buttons(self) -> None:
        busy = self.is_running
        self.segment_button.setEnabled(not busy and bool(self.prompt()) and self.image_combo.count() > 0)
        self.stop_button.setEnabled(busy)
        self.model_button.setEnabled(not busy)
        self.adapter_combo.setEnabled(not busy)
        self.adapt_button.setEnabled(not busy)

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
        index = self.adapter_combo.findData(self.adapter)
        self.adapter_combo.setCurrentIndex(max(index, 0))
        self.adapter_combo.blockSignals(False)
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
        order = _default_order(self.model)
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

    def _adapter_chosen(self, index: int) -> None:
        self.set_model(self.model, self.adapter_combo.itemData(index))

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
            run = self._prepare_run()
        except MRISError as exc:
            self._fail(str(exc))
            return
        self._run = run
        self._remember("\n".join([run.prompt, *(prompt for _, _, prompt in self._pending)]))
        self.progress_bar.setValue(0)
        if self._pipeline is None:
            self._load_model()
        else:
            self._start_stream()
        self._update_buttons()

    def _prepare_run(self) -> _Run:
        """The first finding's run; the others wait in `self._pending`. A bad list of findings (empty line,
        repeat, too many) is refused here, before anything is drawn or changed."""
        if not self.prompt():
            raise MRISError("Type a prompt describing the finding first")
        prompts = check_findings(self.findings())
        image = self.image_layer()
        if image is None:
            raise MRISError("Open an image first (File > Open, or File > Open Sample > napari-mris)")
        plane = self._plane_of(image)
        labels = self._labels_for(image)
        values = _labels_for_findings(labels, prompts)
        before = np.array(labels.data[plane], copy=True)
        settings = {"order": self.order_combo.currentData(), "samples": self.samples_spin.value()}
        self._pending = [(i, values[i], prompts[i]) for i in range(1, len(prompts))]
        count = self.lesions_check.isChecked()
        return _Run(image, labels, values[0], plane, prompts[0], settings, before, count_lesions=count)

    def _plane_of(self, image: Image) -> tuple[int, ...]:
        """() for a 2D image; (z,) of the plane shown in the viewer for a stack."""
        if image.rgb:
            raise UnsupportedImageError(f"{image.name!r} is an RGB image; MRIS segments grayscale slices")
        if image.multiscale:
            raise UnsupportedImageError(f"{image.name!r} is a multiscale pyramid; open a single-resolution slice")
        if image.ndim == 2:
            return ()
        if image.ndim != 3:
            raise UnsupportedImageError(
                f"{image.name!r} has {image.ndim} dimensions; MRIS works on 2D slices or stacks"
            )
        point = image.world_to_data(self.viewer.dims.point[-image.ndim :])
        z = int(np.clip(round(float(point[0])), 0, image.data.shape[0] - 1))
        return (z,)

    def _labels_for(self, image: Image) -> Labels:
        """The MRIS Labels layer of this image (same shape and geometry), created on first use."""
        for layer in self.viewer.layers:
            mine = isinstance(layer, Labels) and layer.metadata.get("mris_image") == image.name
            if mine and layer.data.shape == image.data.shape:
                return layer
        source = image.metadata.get("mris_slice")
        if not isinstance(source, Slice):
            source = _slice_from_layer(image)
        name = LABELS_NAME if LABELS_NAME not in self.viewer.layers else f"{LABELS_NAME} {image.name}"
        return self.viewer.add_labels(
            np.zeros(image.data.shape, np.uint16),
            name=name,
            scale=image.scale,
            translate=image.translate,
            metadata={"mris_image": image.name, "mris_slice": source, "mris_segment_labels": {}, "mris_runs": {}},
        )

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
        if self._run is not None:  # None when Stop was pressed while loading: keep the model, draw nothing
            self._start_stream()

    def _model_failed(self, exc: Exception) -> None:
        self._run = None
        self._fail(_message(exc, "Could not load the model"))

    def _loader_finished(self) -> None:
        self._loader = None
        self._update_buttons()

    def _start_stream(self) -> None:
        run = self._run
        pipeline = self._pipeline
        pixels = np.asarray(run.image.data[run.plane], dtype=np.float32)
        window = _window(run.image, run.plane)
        self._canceller = _Canceller()
        self.destroyed.connect(self._canceller.cancel)
        prompts = [run.prompt, *(prompt for _, _, prompt in self._pending)]
        worker = create_worker(
            _stream_job, pipeline, pixels, prompts, run.settings, window, self._canceller.event, _ignore_errors=True
        )
        worker.yielded.connect(self._on_update)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_worker_finished)
        self._canceller.worker = worker
        run.labels.editable = False
        self._status(f"Segmenting {_which(run, self._pending)}“{_short(run.prompt)}” …")
        worker.start()

    def stop(self) -> None:
        """Cancel at once: the partial mask drawn so far is kept as one undo step."""
        if self._adaptation is not None:
            self._adaptation.stop()
            return
        run, rest = self._run, len(self._pending)
        self._canceller.cancel()
        if run is None:
            return
        self._run, self._pending = None, []
        done = run.last.progress if run.last is not None else 0.0
        kept = self._commit(run)
        note = "the partial mask is kept (Ctrl+Z removes it)" if kept else "nothing was drawn"
        skipped = f"; {rest} later finding{'s' if rest != 1 else ''} not started" if rest else ""
        self._status(f"Stopped at {done:.0%} of label {run.value}: {note}{skipped}")

    def _on_update(self, item: tuple[int, StreamUpdate]) -> None:
        index, update = item
        run = self._run
        if run is None or index != run.index:  # stopped or superseded: updates still queued are dropped
            return
        first = run.last is None
        run.last = update
        self._draw(run, update.mask)
        self.progress_bar.setValue(round(100 * update.progress))
        timings = update.timings
        if first and update.out_of_domain:  # warn once; the run goes on (Stop ends it)
            show_warning(f"MRIS: {_out_of_domain_note(update)}")
        self._status(
            _domain_prefix(update)
            + _which(run, self._pending)
            + f"{update.tokens_done}/{update.tokens_total} tokens · {timings.get('tokens_per_s', 0):.0f} tokens/s · "
            f"{timings.get('total_s', 0):.2f} s"
        )
        if update.finished:
            self._finish(run, update)
            self._next_finding(run)

    def _next_finding(self, previous: _Run) -> None:
        """Start drawing the next finding of the worker's list (its updates follow the previous one's)."""
        if not self._pending:
            return
        index, value, prompt = self._pending.pop(0)
        labels = previous.labels
        before = np.array(labels.data[previous.plane], copy=True)  # after the previous finding's commit
        self._run = _Run(
            previous.image, labels, value, previous.plane, prompt, previous.settings, before, index=index,
            count_lesions=previous.count_lesions,
        )  # fmt: skip
        self.progress_bar.setValue(0)  # the layer stays locked: napari clears the undo history on locking

    def _finish(self, run: _Run, update: StreamUpdate) -> None:
        self._run = None
        lesions = instances(update.mask, run.prompt) if run.count_lesions and not update.not_present else None
        notes = " · ".join([*update.warnings, *([lesions.note] if lesions is not None and lesions.note else [])])
        if update.not_present:  # [REJ], or present but nothing drawn: the layer stays as it was
            self._revert(run)
            self._register(run)
            how = "the model answered not present" if update.rejected else "the model drew no lesion"
            finding = _short(run.prompt, 80)
            message = f"Not present: no lesion found for “{finding}” ({how}; label {run.value} unchanged)"
            self._status(message + (f" ({notes})" if notes else ""))
            show_info(message)
            return
        self._commit(run)
        # Kept on the layer itself, not keyed by id(layer): a widget docked from the Plugins menu sees the
        # layers through napari's PublicOnlyProxy, a new wrapper object on every access.
        predictions = run.labels.metadata.setdefault("mris_predictions", {})
        predictions[run.value] = {"plane": run.plane, "mask": update.mask.copy()}
        if lesions is not None:  # kept with the run's provenance, so an export's sidecar carries the counts
            runs = run.labels.metadata.get("mris_runs", {})
            runs.get(run.value, {}).update(lesions=lesions.count, stated_lesions=lesions.stated)
        if update.uncertainty is not None:
            self._show_uncertainty(run, update.uncertainty)
        seconds = update.timings.get("total_s", 0.0)
        held = int((run.labels.data[run.plane] == run.value).sum())
        kept_by_others = int(update.mask.sum()) - held  # an earlier finding's or a painted label's pixels
        drawn = f"{held} pixels" + (f" ({kept_by_others} of its mask kept by other labels)" if kept_by_others else "")
        drawn += f", {lesions.count} lesion(s)" if lesions is not None else ""
        text = _domain_prefix(update) + f"Done: label {run.value}, {drawn}, {seconds:.2f} s"
        self._status(text + (f" ({notes})" if notes else ""))

    def _on_error(self, exc: Exception) -> None:
        run, self._run, self._pending = self._run, None, []  # the findings already drawn stay
        if run is not None:
            self._revert(run)
        self._fail(_message(exc, "Segmentation failed"))

    def _on_worker_finished(self) -> None:
        run = self._run
        self._pending = []
        if run is not None:  # the stream ended without a finished update (stopped inside the worker)
            self._run = None
            self._commit(run)
        self._canceller.worker = None
        self._update_buttons()

    # ------------------------------------------------------------------ writing to the Labels layer

    def _draw(self, run: _Run, mask: np.ndarray) -> None:
        """Show a partial mask without history: only pixels that are 0 or hold this run's label change."""
        plane = run.labels.data[run.plane]
        allowed = (plane == 0) | (plane == run.value)
        target = np.where(allowed, np.where(mask, run.value, 0), plane).astype(plane.dtype)
        changed = target != plane
        if not changed.any():
            return
        plane[changed] = target[changed]
        run.drawn |= changed
        run.labels.refresh(thumbnail=False, highlight=False, extent=False)  # the canvas only: keeps the loop fast

    def _commit(self, run: _Run) -> bool:
        """Replay the drawing through `data_setitem` as one undo item; returns whether anything changed. The
        layer is unlocked once no finding is left to draw (locking again would clear napari's undo history)."""
        labels = run.labels
        labels.editable = not self._pending
        plane = labels.data[run.plane]
        changed = run.drawn & (plane != run.before)
        if changed.any():
            values = plane[changed].copy()
            plane[changed] = run.before[changed]  # back to the start, silently ...
            rows, cols = np.nonzero(changed)
            index = tuple(np.full(rows.shape, z) for z in run.plane) + (rows, cols)
            labels.data_setitem(index, values)  # ... and forward again, recorded as one history item
        self._register(run)
        labels.refresh(data_displayed=False, highlight=False, extent=False)  # the data is as shown; the thumbnail
        return bool(changed.any())

    def _revert(self, run: _Run) -> None:
        labels = run.labels
        labels.editable = not self._pending
        plane = labels.data[run.plane]
        plane[run.drawn] = run.before[run.drawn]
        labels.refresh()

    def _register(self, run: _Run) -> None:
        """Record the prompt of this label value (metadata for writers, features for the layer's tooltip)."""
        labels = run.labels
        names: dict[int, str] = labels.metadata.setdefault("mris_segment_labels", {})
        if run.last is None or (run.last.not_present and run.value not in names):
            return  # stopped before any update, or the model found nothing: no new label value
        names[run.value] = run.prompt
        if self._pipeline is not None:
            provenance = {
                "prompt": run.prompt,
                "rejected": run.last.rejected,
                "finished": run.last.finished,
                "model_id": self._pipeline.model_id,
                "model_hash": self._pipeline.model_hash,
                "adapter": self._pipeline.adapter,
                "settings": self._pipeline.settings(**run.settings).to_dict(),
                "timings": dict(run.last.timings),
                "plane": list(run.plane),
            }
            labels.metadata.setdefault("mris_runs", {})[run.value] = provenance
        values = sorted(names)
        labels.features = {"index": [0, *values], "prompt": ["", *(names[v] for v in values)]}
        labels.selected_label = run.value

    def _show_uncertainty(self, run: _Run, uncertainty: np.ndarray) -> None:
        name = UNCERTAINTY_NAME
        layer = next((layer for layer in self.viewer.layers if layer.name == name), None)
        if layer is None or layer.data.shape != run.image.data.shape:
            data = np.zeros(run.image.data.shape, np.float32)
            data[run.plane] = uncertainty
            if layer is not None:
                self.viewer.layers.remove(layer)
            self.viewer.add_image(
                data,
                name=name,
                scale=run.image.scale,
                translate=run.image.translate,
                colormap="magma",
                blending="additive",
                opacity=0.6,
                contrast_limits=(0.0, 0.5),
            )
            return
        layer.data[run.plane] = uncertainty
        layer.refresh()

    # ------------------------------------------------------------------ export and corrections

    def labels_layer(self) -> Labels | None:
        """The MRIS Labels layer to export: the selected one if it is an MRIS layer, else the image's."""
        active = self.viewer.layers.selection.active
        if isinstance(active, Labels) and "mris_slice" in active.metadata:
            return active
        image = self.image_layer()
        for layer in self.viewer.layers:
            mris = isinstance(layer, Labels) and "mris_slice" in layer.metadata
            if mris and (image is None or layer.metadata.get("mris_image") == image.name):
                return layer
        return None

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

    def save_example(self):
        """Add (current plane, prompt, corrected mask, model's prediction) to the corrections store."""
        from napari_mris.corrections import CorrectionsStore

        labels = self.labels_layer()
        names = labels.metadata.get("mris_segment_labels", {}) if labels is not None else {}
        value = labels.selected_label if labels is not None else 0
        if value not in names:
            value = max(names, default=0)
        if labels is None or value not in names:
            self._fail("Nothing to save yet: run a segmentation first, then correct it with the paint tools")
            return None
        image = next((layer for layer in self.viewer.layers if layer.name == labels.metadata.get("mris_image")), None)
        if image is None:
            self._fail("The image of this MRIS layer was closed; cannot save the example without it")
            return None
        prediction = labels.metadata.get("mris_predictions", {}).get(value)
        plane = prediction["plane"] if prediction is not None else self._plane_of(image)
        source = labels.metadata["mris_slice"]
        run = labels.metadata.get("mris_runs", {}).get(value, {})
        try:
            record = CorrectionsStore(self.corrections_root).add(
                np.asarray(image.data[plane]),
                names[value],
                np.asarray(labels.data[plane]) == value,
                prediction=prediction["mask"] if prediction is not None else None,
                window=_window(image, plane),
                spacing=tuple(source.spacing[-2:]),
                model_id=run.get("model_id"),
                model_hash=run.get("model_hash"),
            )
        except (MRISError, OSError) as exc:
            self._fail(f"Could not save the training example: {exc}")
            return None
        self._status(f"Saved training example {record.name} (label {value})")
        return record

    # ------------------------------------------------------------------ adapting to the corrections

    def adapt(self) -> None:
        """Fine-tune a LoRA adapter on the corrections store in a child process, then switch to it."""
        from napari_mris.adaptation import AdaptationJob, adapter_name
        from napari_mris.corrections import CorrectionsStore

        if self.is_running:
            return
        model_dir = DEFAULT_MODEL_DIR if str(self.model) == "default" else Path(self.model)
        store = CorrectionsStore(self.corrections_root)
        job = AdaptationJob(model_dir, store.root, adapter_name(), self.adapt_steps, self.replay_data)
        worker = create_worker(job.run, _ignore_errors=True)
        worker.yielded.connect(self._on_adapt_progress)
        worker.returned.connect(self._on_adapted)
        worker.errored.connect(lambda exc: self._fail(_message(exc, "Adaptation failed")))
        worker.finished.connect(self._adapt_finished)
        self.destroyed.connect(job.stop)  # closing napari mid-run ends the child too
        self._adaptation = job
        self.progress_bar.setValue(0)
        self._status(f"Adapting {model_dir.name} to {len(store)} saved example(s) …")
        self._update_buttons()
        worker.start()

    def _on_adapt_progress(self, progress) -> None:
        self.progress_bar.setValue(round(100 * progress.step / max(progress.total, 1)))
        self._status(f"Adapting: step {progress.step}/{progress.total}, loss {progress.loss:.3f}")

    def _on_adapted(self, name: str) -> None:
        self._adaptation = None
        self.set_model(self.model, name)
        self._status(f"Adapted: now using adapter {name} (Adapter > none goes back to the base model)")

    def _adapt_finished(self) -> None:
        self._adaptation = None
        self._update_buttons()


# ---------------------------------------------------------------------- helpers


def _stream_job(pipeline, pixels, prompts, settings, window, stop: threading.Event):
    """The worker's generator: (finding index, update) of the pipeline's stream of findings, polled for the
    stop flag between decoding steps."""
    yield from pipeline.stream_findings(pixels, prompts, window=window, should_stop=stop.is_set, **settings)


def _labels_for_findings(labels: Labels, prompts: list[str]) -> list[int]:
    """The label value of each finding in the layer: reused for a prompt it already has, else the next free
    one (distinct for the new findings of one run)."""
    names: dict[int, str] = labels.metadata.setdefault("mris_segment_labels", {})
    known = {text.casefold(): int(value) for value, text in names.items()}
    used = max([0, *names, int(np.max(labels.data))])
    values = []
    for prompt in prompts:
        if prompt.casefold() not in known:
            used += 1
            if used > np.iinfo(labels.data.dtype).max:
                raise MRISError(f"The layer {labels.name!r} has no free label value left; start a new Labels layer")
            known[prompt.casefold()] = used
        values.append(known[prompt.casefold()])
    return values


def _which(run: _Run, pending: list[tuple[int, int, str]]) -> str:
    """'finding 1 of 3: ' when a run has several findings, else nothing."""
    return f"finding {run.index + 1} of {run.index + 1 + len(pending)}: " if pending or run.index else ""


def _slice_from_layer(image: Image) -> Slice:
    """A Slice for an image that was not opened by the MRIS reader: geometry from the layer, no DICOM."""
    ndim = image.data.ndim
    return Slice(
        pixels=np.asarray(image.data),
        spacing=tuple(float(s) for s in image.scale),
        origin=tuple(float(t) for t in image.translate),
        direction=np.eye(ndim),
        name=image.name,
    )


def _window(image: Image, plane: tuple[int, ...]) -> tuple[float, float] | None:
    source = image.metadata.get("mris_slice")
    if isinstance(source, Slice):
        return source.window
    return None


def _default_order(model: str | Path) -> str | None:
    """The model's `default_order` from its config.json, read without loading torch (None if unset)."""
    path = (DEFAULT_MODEL_DIR if str(model) == "default" else Path(model)) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("default_order")
    except (OSError, ValueError, AttributeError):
        return None  # a missing or broken config is reported when the model loads


def _vocabulary(model: str | Path) -> PromptVocabulary | None:
    """The model's prompt vocabulary, read without loading torch (None: none recorded, or unreadable, which
    loading the model reports)."""
    try:
        return PromptVocabulary.load(DEFAULT_MODEL_DIR if str(model) == "default" else Path(model))
    except MRISError:
        return None


def _out_of_domain_note(update: StreamUpdate) -> str:
    return next((note for note in update.warnings if note.startswith("out of domain")), "out of domain")


def _domain_prefix(update: StreamUpdate) -> str:
    """'⚠ OUT OF DOMAIN · ' for a slice the model's domain guard flags, else nothing."""
    return "⚠ OUT OF DOMAIN (mask likely meaningless) · " if update.out_of_domain else ""


def _adapters(model: str | Path) -> list[str]:
    """The adapters of this model in the user's adapters folder ([] when the model cannot be read yet)."""
    from napari_mris.adapters import list_adapters

    try:
        return list_adapters(DEFAULT_MODEL_DIR if str(model) == "default" else Path(model))
    except (MRISError, OSError):  # a missing or damaged model directory: the load reports it in plain words
        return []


def _message(exc: Exception, context: str) -> str:
    if isinstance(exc, MRISError):
        return str(exc)
    log.error("%s", context, exc_info=exc)
    return f"{context}: {type(exc).__name__}: {exc}"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
