"""Streamed masks into a napari Labels layer: the layers' side of a segmentation, without any Qt widget.

The dock widget (`_widget.py`) runs the model in a worker and hands every update to a `LabelsController`,
which owns what happens to the layers: which Labels layer and label value a finding gets, drawing the
partial masks, one undo step per finding, taking a drawing back, and what is recorded on the layer. As in
micro-sam, where an annotator's state lives apart from its widgets, this keeps the dock to layout, buttons
and status, and lets the drawing rules be tested on a bare `napari.components.ViewerModel`.

Labels and undo: one Labels layer ("MRIS") per image, one label value per prompt, the prompt stored in
`layer.metadata["mris_segment_labels"]` and `layer.features`. While the model streams, partial masks are
drawn straight into the layer (no history) and the layer is locked for painting; when the finding ends, the
drawing is replayed through `layer.data_setitem` as ONE history item, so a single Ctrl+Z removes a whole
segmentation. A run only writes pixels that are 0 or already hold its own label value, never a label the
user painted for another finding. Stop keeps what was drawn so far (as one undo step); an error, or a
finished answer "not present", takes the streamed drawing back and leaves the plane as it was.

Several findings are drawn in turn, each with its own label and undo step; the layer stays locked from the
first to the last, because napari clears a Labels layer's undo history whenever it is locked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels

from napari_mris.errors import MRISError, UnsupportedImageError
from napari_mris.findings import Instances, check_findings, instances
from napari_mris.io.slice import Slice

if TYPE_CHECKING:
    from napari.components import ViewerModel

    from napari_mris.pipeline import MRISPipeline, StreamUpdate

LABELS_NAME = "MRIS"
UNCERTAINTY_NAME = "MRIS uncertainty"


@dataclass
class LabelRun:
    """One finding being drawn: where it draws and what the plane looked like before."""

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
    pipeline: MRISPipeline | None = None  # what draws it, for the provenance; set when the stream starts

    def __post_init__(self) -> None:
        self.drawn = np.zeros(self.before.shape, bool)


@dataclass(frozen=True)
class FindingDone:
    """What a finished finding left in the layer, for the status line."""

    run: LabelRun
    update: StreamUpdate
    held: int  # pixels holding the run's label on its plane afterwards (0 when taken back)
    lesions: Instances | None  # its lesions, when they were to be counted and something was drawn

    @property
    def kept_by_others(self) -> int:
        """Pixels of the finished mask that an earlier finding or a painted label keeps."""
        return int(self.update.mask.sum()) - self.held

    @property
    def notes(self) -> str:
        lesion_note = [self.lesions.note] if self.lesions is not None and self.lesions.note else []
        return " · ".join([*self.update.warnings, *lesion_note])


@dataclass(frozen=True)
class Stopped:
    """A run ended by Stop: whether its partial mask stayed, and how many later findings never started."""

    run: LabelRun
    kept: bool
    skipped: int


class LabelsController:
    """The findings of one segmentation request, drawn one after the other into the image's Labels layer."""

    def __init__(self, viewer: ViewerModel) -> None:
        self.viewer = viewer
        self.run: LabelRun | None = None  # the finding being drawn
        self.pending: list[tuple[int, int, str]] = []  # (index, label value, prompt) of findings still to come

    @property
    def active(self) -> bool:
        return self.run is not None

    def prompts(self) -> list[str]:
        """The prompts of the current finding and of those still to come, in order."""
        first = [self.run.prompt] if self.run is not None else []
        return first + [prompt for _, _, prompt in self.pending]

    def which(self) -> str:
        """'finding 1 of 3: ' when the request has several findings, else nothing."""
        run = self.run
        if run is None or not (self.pending or run.index):
            return ""
        return f"finding {run.index + 1} of {run.index + 1 + len(self.pending)}: "

    # ------------------------------------------------------------------ a request's lifetime

    def start(
        self, image: Image, findings: list[str], settings: dict[str, Any], *, count_lesions: bool = False
    ) -> LabelRun:
        """Prepare the first finding's run on the plane shown; the others wait in `pending`. A bad list of
        findings (empty line, repeat, too many) or image is refused here, before anything is drawn."""
        prompts = check_findings(findings)
        plane = plane_of(self.viewer, image)
        labels = self.labels_for(image)
        values = labels_for_findings(labels, prompts)
        before = np.array(labels.data[plane], copy=True)
        self.pending = [(i, values[i], prompts[i]) for i in range(1, len(prompts))]
        self.run = LabelRun(image, labels, values[0], plane, prompts[0], settings, before, count_lesions=count_lesions)
        return self.run

    def stream_started(self, pipeline: MRISPipeline) -> None:
        """The model starts drawing: lock the layer for painting until the last finding ends."""
        self.run.pipeline = pipeline
        self.run.labels.editable = False

    def current(self, index: int) -> LabelRun | None:
        """The run that an update of finding `index` belongs to; None once stopped or superseded (an update
        still queued from the worker is then dropped)."""
        return self.run if self.run is not None and index == self.run.index else None

    def draw(self, run: LabelRun, update: StreamUpdate) -> None:
        """Show a partial mask without history: only pixels that are 0 or hold this run's label change."""
        run.last = update
        plane = run.labels.data[run.plane]
        allowed = (plane == 0) | (plane == run.value)
        target = np.where(allowed, np.where(update.mask, run.value, 0), plane).astype(plane.dtype)
        changed = target != plane
        if not changed.any():
            return
        plane[changed] = target[changed]
        run.drawn |= changed
        run.labels.refresh(thumbnail=False, highlight=False, extent=False)  # the canvas only: keeps the loop fast

    def finish(self, update: StreamUpdate) -> FindingDone:
        """The current finding's last update: keep its drawing as one undo step, or, for an answer "not
        present", take back what was streamed (the label keeps what it held before)."""
        run, self.run = self.run, None
        lesions = instances(update.mask, run.prompt) if run.count_lesions and not update.not_present else None
        if update.not_present:  # [REJ], or present but nothing drawn: the layer stays as it was
            self._revert(run)
            self._register(run)
            return FindingDone(run, update, 0, None)
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
        held = int((run.labels.data[run.plane] == run.value).sum())
        return FindingDone(run, update, held, lesions)

    def next_finding(self, previous: LabelRun) -> LabelRun | None:
        """Start drawing the next finding of the worker's list (its updates follow the previous one's)."""
        if not self.pending:
            return None
        index, value, prompt = self.pending.pop(0)
        before = np.array(previous.labels.data[previous.plane], copy=True)  # after the previous finding's commit
        self.run = LabelRun(
            previous.image, previous.labels, value, previous.plane, prompt, previous.settings, before, index=index,
            count_lesions=previous.count_lesions, pipeline=previous.pipeline,
        )  # fmt: skip
        return self.run  # the layer stays locked: napari clears the undo history on locking

    def stop(self) -> Stopped | None:
        """Stop: the partial mask drawn so far stays as one undo step; later findings are not started."""
        run, skipped = self.run, len(self.pending)
        if run is None:
            return None
        self.run, self.pending = None, []
        return Stopped(run, self._commit(run), skipped)

    def abort(self) -> None:
        """An error (or a model that did not load): take back the current finding's drawing; the findings
        already drawn stay."""
        run, self.run, self.pending = self.run, None, []
        if run is not None:
            self._revert(run)

    def stream_ended(self) -> None:
        """The worker ended without a finished update (stopped inside it): keep what was drawn."""
        run, self.run, self.pending = self.run, None, []
        if run is not None:
            self._commit(run)

    def release(self, layer: Any) -> bool:
        """`layer` was removed from the viewer: end the request if it draws from or into it (the Labels stay
        when only the image went: what was drawn is kept and unlocked). Returns whether a request ended."""
        run = self.run
        if run is None or layer not in (run.image, run.labels):
            return False
        self.run, self.pending = None, []
        if layer is run.image:
            self._commit(run)
        return True

    # ------------------------------------------------------------------ the layers

    def labels_for(self, image: Image) -> Labels:
        """The MRIS Labels layer of this image (same shape and geometry), created on first use."""
        for layer in self.viewer.layers:
            mine = isinstance(layer, Labels) and layer.metadata.get("mris_image") == image.name
            if mine and layer.data.shape == image.data.shape:
                return layer
        source = image.metadata.get("mris_slice")
        if not isinstance(source, Slice):
            source = slice_from_layer(image)
        name = LABELS_NAME if LABELS_NAME not in self.viewer.layers else f"{LABELS_NAME} {image.name}"
        return self.viewer.add_labels(
            np.zeros(image.data.shape, np.uint16),
            name=name,
            scale=image.scale,
            translate=image.translate,
            metadata={"mris_image": image.name, "mris_slice": source, "mris_segment_labels": {}, "mris_runs": {}},
        )

    def _commit(self, run: LabelRun) -> bool:
        """Replay the drawing through `data_setitem` as one undo item; returns whether anything changed. The
        layer is unlocked once no finding is left to draw (locking again would clear napari's undo history)."""
        labels = run.labels
        labels.editable = not self.pending
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

    def _revert(self, run: LabelRun) -> None:
        labels = run.labels
        labels.editable = not self.pending
        plane = labels.data[run.plane]
        plane[run.drawn] = run.before[run.drawn]
        labels.refresh()

    def _register(self, run: LabelRun) -> None:
        """Record the prompt of this label value (metadata for writers, features for the layer's tooltip)."""
        labels = run.labels
        names: dict[int, str] = labels.metadata.setdefault("mris_segment_labels", {})
        if run.last is None or (run.last.not_present and run.value not in names):
            return  # stopped before any update, or the model found nothing: no new label value
        names[run.value] = run.prompt
        if run.pipeline is not None:
            provenance = {
                "prompt": run.prompt,
                "rejected": run.last.rejected,
                "finished": run.last.finished,
                "model_id": run.pipeline.model_id,
                "model_hash": run.pipeline.model_hash,
                "adapter": run.pipeline.adapter,
                "settings": run.pipeline.settings(**run.settings).to_dict(),
                "timings": dict(run.last.timings),
                "plane": list(run.plane),
            }
            labels.metadata.setdefault("mris_runs", {})[run.value] = provenance
        values = sorted(names)
        labels.features = {"index": [0, *values], "prompt": ["", *(names[v] for v in values)]}
        labels.selected_label = run.value

    def _show_uncertainty(self, run: LabelRun, uncertainty: np.ndarray) -> None:
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


# ---------------------------------------------------------------------- helpers


def plane_of(viewer: ViewerModel, image: Image) -> tuple[int, ...]:
    """() for a 2D image; (z,) of the plane shown in the viewer for a stack."""
    if image.rgb:
        raise UnsupportedImageError(f"{image.name!r} is an RGB image; MRIS segments grayscale slices")
    if image.multiscale:
        raise UnsupportedImageError(f"{image.name!r} is a multiscale pyramid; open a single-resolution slice")
    if image.ndim == 2:
        return ()
    if image.ndim != 3:
        raise UnsupportedImageError(f"{image.name!r} has {image.ndim} dimensions; MRIS works on 2D slices or stacks")
    point = image.world_to_data(viewer.dims.point[-image.ndim :])
    z = int(np.clip(round(float(point[0])), 0, image.data.shape[0] - 1))
    return (z,)


def labels_for_findings(labels: Labels, prompts: list[str]) -> list[int]:
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


def mris_labels_layer(viewer: ViewerModel, image: Image | None) -> Labels | None:
    """The MRIS Labels layer to export or save from: the selected one if it is an MRIS layer, else the
    image's."""
    active = viewer.layers.selection.active
    if isinstance(active, Labels) and "mris_slice" in active.metadata:
        return active
    for layer in viewer.layers:
        mris = isinstance(layer, Labels) and "mris_slice" in layer.metadata
        if mris and (image is None or layer.metadata.get("mris_image") == image.name):
            return layer
    return None


def slice_from_layer(image: Image) -> Slice:
    """A Slice for an image that was not opened by the MRIS reader: geometry from the layer, no DICOM."""
    ndim = image.data.ndim
    return Slice(
        pixels=np.asarray(image.data),
        spacing=tuple(float(s) for s in image.scale),
        origin=tuple(float(t) for t in image.translate),
        direction=np.eye(ndim),
        name=image.name,
    )


def source_window(image: Image) -> tuple[float, float] | None:
    """The display window of the file the image came from (a DICOM VOI LUT), when the MRIS reader opened it."""
    source = image.metadata.get("mris_slice")
    return source.window if isinstance(source, Slice) else None
