"""The local corrections dataset: (image, prompt, corrected mask) triples saved from the widget.

The folder is in the LViT layout, so `napari-mris-train finetune` (and any LViT loader) reads it as one split::

    root/img/<name>.png                 the slice as 8-bit grayscale, at its own resolution
    root/labelcol/mask_<name>.png       the radiologist's corrected mask, 0/255
    root/pred/mask_<name>.png           what the model drew before the correction, 0/255 (for audits)
    root/corrections_text.csv           columns Image (mask file name), Description (the prompt)
    root/manifest.json                  one entry per example: files, prompt, model id and hash, UTC time

Why names are hashes: a name derived from the pixels and the prompt carries no patient identifier (file
names of DICOM exports often hold the patient's name), and saving the same image and prompt again
replaces the earlier example instead of piling up near-duplicates. No DICOM attribute is stored; only the
pixel spacing goes into the manifest.

Why the write order: every file is written atomically, the pixel files first and the two index files
(text table, then manifest) last. A crash at any point leaves every indexed example with complete files;
at worst an unindexed image file is left behind, which the next save of the same example overwrites.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from napari_mris.errors import DatasetError, PromptError
from napari_mris.io.atomic import atomic_path, write_text_atomic

TEXT_FILE = "corrections_text.csv"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
WINDOW_PERCENTILES = (0.5, 99.5)  # the same contrast rule the model's preprocessing uses without a VOI window


def default_root() -> Path:
    """`$NAPARI_MRIS_HOME/corrections`, by default `~/.napari-mris/corrections`."""
    home = os.environ.get("NAPARI_MRIS_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".napari-mris") / "corrections"


@dataclass
class CorrectionRecord:
    """One manifest entry. Paths are relative to the store's root."""

    name: str
    image: str
    mask: str
    prediction: str | None
    prompt: str
    model_id: str | None
    model_hash: str | None
    shape: tuple[int, int]
    spacing: tuple[float, float]
    saved_utc: str


class CorrectionsStore:
    """Adds, replaces and lists examples of one corrections folder."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    # ------------------------------------------------------------------ public API

    def add(
        self,
        image: np.ndarray,
        prompt: str,
        mask: np.ndarray,
        *,
        prediction: np.ndarray | None = None,
        window: tuple[float, float] | None = None,
        spacing: tuple[float, float] = (1.0, 1.0),
        model_id: str | None = None,
        model_hash: str | None = None,
    ) -> CorrectionRecord:
        """Save one example (replacing an earlier save of the same image and prompt) and return its record."""
        image, mask = _check_pair(image, mask)
        prompt = normalise_prompt(prompt)
        if prediction is not None:
            prediction = _check_pair(image, prediction)[1]
        name = example_name(image, prompt)
        record = CorrectionRecord(
            name=name,
            image=f"img/{name}.png",
            mask=f"labelcol/mask_{name}.png",
            prediction=f"pred/mask_{name}.png" if prediction is not None else None,
            prompt=prompt,
            model_id=model_id,
            model_hash=model_hash,
            shape=(int(image.shape[0]), int(image.shape[1])),
            spacing=(float(spacing[0]), float(spacing[1])),
            saved_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        _write_png(self.root / record.image, to_uint8(image, window))
        _write_png(self.root / record.mask, mask.astype(np.uint8) * 255)
        if prediction is not None:
            _write_png(self.root / record.prediction, prediction.astype(np.uint8) * 255)
        else:
            (self.root / f"pred/mask_{name}.png").unlink(missing_ok=True)  # a stale prediction would mislead audits
        records = {r.name: r for r in self.records()}
        records[name] = record
        self._write_index(records)
        return record

    def records(self) -> list[CorrectionRecord]:
        """The examples listed in the manifest, in the order they were first saved."""
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            return []
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data["examples"]
            return [_record_from_json(entry) for entry in entries]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: the corrections manifest is damaged ({exc}); fix or move it away") from exc

    def __len__(self) -> int:
        return len(self.records())

    @property
    def text_file(self) -> Path:
        return self.root / TEXT_FILE

    # ------------------------------------------------------------------ index files

    def _write_index(self, records: dict[str, CorrectionRecord]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["Image", "Description"])
        for record in records.values():
            writer.writerow([Path(record.mask).name, record.prompt])
        write_text_atomic(self.text_file, buffer.getvalue())
        manifest = {"format_version": MANIFEST_VERSION, "examples": [asdict(r) for r in records.values()]}
        write_text_atomic(self.root / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------------- helpers


def normalise_prompt(prompt: str) -> str:
    """Collapse whitespace; the stored description must be one line of a CSV cell."""
    text = re.sub(r"\s+", " ", prompt or "").strip()
    if not re.search(r"\w", text):
        raise PromptError("Cannot save a training example without a prompt: type the finding first")
    return text


def example_name(image: np.ndarray, prompt: str) -> str:
    """`mris_<16 hex>` from the pixels (values, shape) and the case-folded prompt."""
    digest = hashlib.sha256()
    pixels = np.ascontiguousarray(image, dtype=np.float32)
    digest.update(repr(pixels.shape).encode())
    digest.update(pixels.tobytes())
    digest.update(normalise_prompt(prompt).casefold().encode("utf-8"))
    return f"mris_{digest.hexdigest()[:16]}"


def to_uint8(image: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """The slice as 8-bit grayscale: 8-bit data unchanged, else clipped to the window (or percentiles)."""
    if window is None and image.dtype == np.uint8:
        return image
    values = image.astype(np.float64)
    if window is None and np.issubdtype(image.dtype, np.integer) and values.min() >= 0 and values.max() <= 255:
        return values.astype(np.uint8)
    low, high = window if window is not None else tuple(np.percentile(values, WINDOW_PERCENTILES))
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round(np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_pair(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 2:
        raise DatasetError(f"A training example needs a 2D slice; got an image of shape {image.shape}")
    if mask.shape != image.shape:
        raise DatasetError(f"The mask is {mask.shape} but the image is {image.shape}; they must match")
    return image, mask.astype(bool)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(tmp, format="PNG")


def _record_from_json(entry: dict) -> CorrectionRecord:
    entry = dict(entry)
    entry["shape"] = tuple(entry["shape"])
    entry["spacing"] = tuple(entry["spacing"])
    return CorrectionRecord(**entry)
