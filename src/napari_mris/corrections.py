"""The local corrections dataset: (image, prompt, corrected mask) triples saved from the widget.

The folder is in the LViT layout, so `napari-mris-train finetune` (and any LViT loader) reads it as one split::

    root/img/<name>.png                 the slice as 8-bit grayscale, at its own resolution
    root/labelcol/mask_<name>.png       the radiologist's corrected mask, 0/255
    root/pred/mask_<name>.png           what the model drew before the correction, 0/255 (for audits)
    root/corrections_text.csv           columns Image (mask file name), Description (the prompt)
    root/corrections.jsonl              the journal: one JSON record per save (files, prompt, model id and
                                        hash, shape, spacing, UTC time); the last record of a name wins

Why names are hashes: a name derived from the pixels and the prompt carries no patient identifier (file
names of DICOM exports often hold the patient's name), and saving the same image and prompt again
replaces the earlier example instead of piling up near-duplicates. No DICOM attribute is stored; only the
pixel spacing goes into the journal.

Why a journal: a save appends one line to the journal and (for a new name) one row to the text table,
each with a flush and fsync, so a save costs the same at 10 and at 10,000 examples; nothing is rewritten.
The text table stays a CSV that is only appended to, because the LViT loader of the training package
(and any other LViT tool) reads `*_text.csv`; the journal is the record of truth for everything else.

Why staging: a save first writes all its files into `.staging/<name>.<id>/`, and last a `record.json`
that marks the stage complete. Only then are the files renamed into img/, labelcol/ and pred/ and the
index lines appended. Opening the store (and every save) recovers what a crash left behind: an incomplete
stage is deleted (nothing visible had changed), a complete one is rolled forward (the remaining renames,
and the journal line and CSV row when they are not the last lines yet), and a torn last line of the journal
or the text table is cut off. So after a crash at any point and the next open, every record has its files,
every pixel file has a record, and no temporary file is left. Writers take an advisory lock (`.lock`,
POSIX `flock`); on Windows, where there is none, use one writer per store at a time.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from napari_mris.errors import DatasetError, PromptError
from napari_mris.io.atomic import write_text_atomic

try:
    import fcntl
except ImportError:  # Windows: no advisory locks in the standard library that fit; see the module docstring
    fcntl = None

log = logging.getLogger(__name__)

TEXT_FILE = "corrections_text.csv"
JOURNAL_FILE = "corrections.jsonl"
STAGING_DIR = ".staging"
LOCK_FILE = ".lock"
STAGE_RECORD = "record.json"
LEGACY_MANIFEST = "manifest.json"  # format 1 (rewritten on every save); converted to the journal on open
LEGACY_TEMPS = (".manifest.*.json", ".corrections.*.jsonl", ".corrections_text.*.csv")  # atomic_path's temp names
PIXEL_DIRS = ("img", "labelcol", "pred")
TEXT_HEADER = "Image,Description\n"
WINDOW_PERCENTILES = (0.5, 99.5)  # the same contrast rule the model's preprocessing uses without a VOI window


def default_root() -> Path:
    """`$NAPARI_MRIS_HOME/corrections`, by default `~/.napari-mris/corrections`."""
    home = os.environ.get("NAPARI_MRIS_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".napari-mris") / "corrections"


@dataclass
class CorrectionRecord:
    """One journal entry. Paths are relative to the store's root."""

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
    """Adds, replaces and lists examples of one corrections folder; opening it recovers from a crash."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.recovered: list[str] = []  # what opening repaired (also logged), for callers and tests
        if self._needs_recovery():
            with self._locked():
                self._recover()

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
        pixels = {"img.png": to_uint8(image, window), "mask.png": mask.astype(np.uint8) * 255}
        if prediction is not None:
            pixels["pred.png"] = prediction.astype(np.uint8) * 255
        with self._locked():
            self._recover()  # a crash of another writer since this store was opened is finished first
            stage = self._stage(record, pixels)
            self._apply(stage)
        return record

    def records(self) -> list[CorrectionRecord]:
        """The examples in the journal, latest save of each name, in the order they were first saved."""
        path = self.journal
        if not path.is_file():
            return []
        latest: dict[str, CorrectionRecord] = {}
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.endswith("\n"):
                    break  # a save in progress in another process (or a crash the next open repairs)
                try:
                    record = _record_from_json(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise DatasetError(
                        f"{path} line {number}: the corrections journal is damaged ({exc}); fix or delete that line"
                    ) from exc
                latest[record.name] = record  # a re-save keeps the example's first position
        return list(latest.values())

    def __len__(self) -> int:
        return len(self.records())

    @property
    def text_file(self) -> Path:
        return self.root / TEXT_FILE

    @property
    def journal(self) -> Path:
        return self.root / JOURNAL_FILE

    # ------------------------------------------------------------------ one save: stage, apply, commit

    def _stage(self, record: CorrectionRecord, pixels: dict[str, np.ndarray]) -> Path:
        """Write every file of the save into a fresh staging folder; `record.json` last marks it complete."""
        stage = self.root / STAGING_DIR / f"{record.name}.{uuid.uuid4().hex[:12]}"
        stage.mkdir(parents=True)
        for file_name, array in pixels.items():
            _write_png_durably(stage / file_name, array)
        content = {
            "record": asdict(record),
            "new": not (self.root / record.image).exists(),  # decides whether the text table gets a row
        }
        partial = stage / (STAGE_RECORD + ".part")
        _write_durably(partial, json.dumps(content).encode("utf-8"))
        os.replace(partial, stage / STAGE_RECORD)
        return stage

    def _apply(self, stage: Path) -> None:
        """Roll a complete stage forward; every step is idempotent, so recovery can repeat it after a crash."""
        content = json.loads((stage / STAGE_RECORD).read_text(encoding="utf-8"))
        record = _record_from_json(content["record"])
        moves = {"img.png": record.image, "mask.png": record.mask, "pred.png": record.prediction}
        for file_name, target in moves.items():
            staged = stage / file_name
            if target is not None and staged.exists():
                (self.root / target).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, self.root / target)
        if record.prediction is None:  # a stale prediction of an earlier save would mislead audits
            (self.root / f"pred/mask_{record.name}.png").unlink(missing_ok=True)
        line = json.dumps(asdict(record), ensure_ascii=False) + "\n"
        if _last_line(self.journal) != line:
            _append_durably(self.journal, line)
        if content["new"]:
            row = _csv_row(Path(record.mask).name, record.prompt)
            last = _last_line(self.text_file)
            if not last:  # no table yet (or an empty one)
                _append_durably(self.text_file, TEXT_HEADER + row)
            elif last != row:
                _append_durably(self.text_file, row)
        _remove_stage(stage)
        with contextlib.suppress(OSError):  # not empty: another writer's stage (Windows, no lock)
            (self.root / STAGING_DIR).rmdir()

    # ------------------------------------------------------------------ recovery on open

    def _needs_recovery(self) -> bool:
        """A cheap look (no lock, no listing of the pixel folders): is anything left from a crash?"""
        return (
            (self.root / STAGING_DIR).exists()
            or (self.root / LEGACY_MANIFEST).is_file()
            or _torn(self.journal)
            or _torn(self.text_file)
        )

    def _recover(self) -> None:
        """Convert a format-1 store, cut torn last lines, then roll every stage forward or delete it."""
        if (self.root / LEGACY_MANIFEST).is_file():
            self._convert_legacy()
        for path in (self.journal, self.text_file):
            if _cut_torn_tail(path):
                self._note(f"cut a torn last line of {path.name}")
        staging = self.root / STAGING_DIR
        if not staging.is_dir():
            return
        for stage in sorted(staging.iterdir()):
            if (stage / STAGE_RECORD).is_file():
                self._apply(stage)
                self._note(f"finished the interrupted save of {stage.name.split('.')[0]}")
            else:
                _remove_stage(stage)
                self._note(f"discarded the incomplete save {stage.name}")
        with contextlib.suppress(OSError):
            staging.rmdir()

    def _convert_legacy(self) -> None:
        """Format 1 (manifest.json rewritten on each save) -> the journal; unlisted pixel files are removed.

        Repeatable: a crash mid-way leaves manifest.json in place, and the next open converts again.
        """
        path = self.root / LEGACY_MANIFEST
        try:
            records = [_record_from_json(entry) for entry in json.loads(path.read_text(encoding="utf-8"))["examples"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: the corrections manifest is damaged ({exc}); fix or move it away") from exc
        lines = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records)
        write_text_atomic(self.journal, lines)
        write_text_atomic(self.text_file, TEXT_HEADER + "".join(_csv_row(Path(r.mask).name, r.prompt) for r in records))
        listed = {p for r in records for p in (r.image, r.mask, r.prediction) if p is not None}
        removed = 0
        for folder in PIXEL_DIRS:
            directory = self.root / folder
            for file in directory.iterdir() if directory.is_dir() else ():
                if file.is_file() and f"{folder}/{file.name}" not in listed:  # orphans and old temp files
                    file.unlink()
                    removed += 1
        for pattern in LEGACY_TEMPS:  # temporary files of format 1's atomic rewrites (or of a converting crash)
            for file in self.root.glob(pattern):
                file.unlink()
                removed += 1
        path.unlink()
        self._note(f"converted {LEGACY_MANIFEST} ({len(records)} examples) to {JOURNAL_FILE}; removed {removed} files")

    def _note(self, text: str) -> None:
        self.recovered.append(text)
        log.warning("Corrections store %s: %s", self.root, text)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's advisory lock: one writer (or recovery) at a time across processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


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


def _remove_stage(stage: Path) -> None:
    """Delete a staging folder; after a save only `record.json` is left in it, so try the two-call way first."""
    try:
        (stage / STAGE_RECORD).unlink(missing_ok=True)
        stage.rmdir()
    except NotADirectoryError:
        stage.unlink()
    except OSError:  # still holds staged files: an incomplete stage
        shutil.rmtree(stage)


def _csv_row(mask_name: str, prompt: str) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([mask_name, prompt])
    return buffer.getvalue()


def _write_png_durably(path: Path, pixels: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    _write_durably(path, buffer.getvalue())


def _write_durably(path: Path, data: bytes) -> None:
    """Create `path` with `data` and fsync it, so a rename that follows never exposes a short file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_durably(path: Path, text: str) -> None:
    """Append whole lines with one O_APPEND write (looped if short) and fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        _write_all(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _torn(path: Path) -> bool:
    """Whether a non-empty file does not end with a newline (read: one byte)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _cut_torn_tail(path: Path) -> bool:
    """Truncate a file after its last newline; returns whether anything was cut."""
    if not _torn(path):
        return False
    with path.open("r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        keep, block = 0, 4096
        for start in range((size - 1) // block * block, -1, -block):
            handle.seek(start)
            newline = handle.read(min(block, size - start)).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _last_line(path: Path) -> str | None:
    """The file's last complete line (with its newline), "" for an empty file, None when there is no file."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return ""
            tail = b""
            start = size
            while start > 0 and tail.count(b"\n") < 2:
                start = max(0, start - 4096)
                handle.seek(start)
                tail = handle.read(size - start)
    except FileNotFoundError:
        return None
    lines = tail.splitlines(keepends=True)
    return lines[-1].decode("utf-8") if lines else ""


def _record_from_json(entry: dict) -> CorrectionRecord:
    entry = dict(entry)
    entry["shape"] = tuple(entry["shape"])
    entry["spacing"] = tuple(entry["spacing"])
    return CorrectionRecord(**entry)
