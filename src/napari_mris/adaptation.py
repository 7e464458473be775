"""Adapt a model to the user's corrections: LoRA fine-tuning run as a child process.

The runtime never imports the training package; it starts `python -m napari_mris_train.cli finetune`
and reads the `step I/N loss L` lines that `--report-steps` prints.

Held back: with `--hold-out`, the child trains on most of the corrections and scores the base model and
the new adapter on the rest (`held_out_names` picks them, `compare_on_held_out` scores them), and stores
the comparison with the adapter (`napari_mris.adapters.EVALUATION`), so the widget can say whether the
adapter helps on the user's own cases before the user switches to it. A separate process also means a
crash or an out-of-memory kill in training can never take napari (and the user's labels) down, and Stop
is a plain terminate. The child writes the adapter by renaming a finished temporary folder, so a stopped
or failed run leaves the model directory exactly as it was, and the base weights are never written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from napari_mris.errors import ModelDirectoryError, MRISError

STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss ([-+0-9.eEnaif]+)$")
HELD_OUT_LINE = re.compile(r"^held-back (\d+)/(\d+)$")  # after training: the held-back cases scored so far
ADAPTER_LINE = re.compile(r"^adapter saved: (.+)$")
REPLAY_PHANTOMS = 64  # without a replay dataset: synthetic phantoms, part of the default model's training data
HELD_OUT_FRACTION = 0.2  # of the corrections, scored and not trained on
MIN_TO_HOLD_OUT = 5  # fewer corrections are all trained on: one held-back case would say nothing
MAX_HELD_OUT = 25  # enough for a rough comparison; more would only take examples from the training


class AdaptationError(MRISError):
    """Fine-tuning could not start or did not finish; the active model is unchanged."""


@dataclass
class AdaptProgress:
    step: int
    total: int
    loss: float  # while the held-back corrections are scored: the last training step's
    phase: str = "training"  # or "held-back": step / total counts the scored held-back cases


@dataclass
class AdaptationJob:
    """One `finetune` run: `run()` yields progress and returns the adapter's name; `stop()` ends it."""

    model_dir: Path
    corrections: Path
    name: str
    steps: int | None = None  # None: the fine-tuning recipe's own number (napari_mris_train.finetune)
    replay_data: Path | None = None
    device: str = "auto"
    held_out_fraction: float = HELD_OUT_FRACTION
    process: subprocess.Popen | None = None
    stopped: bool = False

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "napari_mris_train.cli", "finetune", "--model", str(self.model_dir)]
        args += ["--data", str(self.corrections), "--out", self.name]
        args += ["--steps", str(self.steps)] if self.steps is not None else []
        args += ["--device", self.device, "--report-steps", "--hold-out", str(self.held_out_fraction)]
        if self.replay_data is not None:
            args += ["--replay-data", str(self.replay_data)]
        else:
            args += ["--replay-phantoms", str(REPLAY_PHANTOMS)]
        return args

    def run(self) -> Iterator[AdaptProgress]:
        """Start the child, yield its progress, raise AdaptationError unless it saved the adapter."""
        check_can_adapt(self.model_dir, self.corrections)
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        tail: list[str] = []
        saved = None
        loss = float("nan")
        for line in self.process.stdout:
            line = line.strip()
            if match := STEP_LINE.match(line):
                loss = float(match[3])
                yield AdaptProgress(int(match[1]), int(match[2]), loss)
            elif match := HELD_OUT_LINE.match(line):
                yield AdaptProgress(int(match[1]), int(match[2]), loss, "held-back")
            elif match := ADAPTER_LINE.match(line):
                saved = Path(match[1])
            elif line:
                tail = [*tail[-9:], line]
        code = self.process.wait()
        if self.stopped:
            raise AdaptationError("Adaptation stopped; the model is unchanged")
        if code != 0 or saved is None:
            detail = next((t for t in reversed(tail) if t.startswith("error:")), tail[-1] if tail else "")
            raise AdaptationError(f"Adaptation failed (exit code {code}); the model is unchanged. {detail}".strip())
        return saved.name

    def stop(self) -> None:
        self.stopped = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()


def adapter_name(now: datetime | None = None) -> str:
    """`corrections-YYYYMMDD-HHMMSS` (UTC): sortable, and never the name of an earlier adapter."""
    return f"corrections-{(now or datetime.now(timezone.utc)):%Y%m%d-%H%M%S}"


def check_can_adapt(model_dir: Path, corrections: Path) -> None:
    """The checks that give a clear message before a child process is started."""
    if importlib.util.find_spec("napari_mris_train") is None:
        raise AdaptationError("Adapting needs the training package: pip install napari-mris (with its training part)")
    if not (Path(model_dir) / "model.safetensors").is_file():
        raise AdaptationError(f"{model_dir} has no trained decoder (model.safetensors) to adapt")
    text = Path(corrections) / "corrections_text.csv"
    if not text.is_file() or sum(1 for _ in text.open(encoding="utf-8")) < 2:
        raise AdaptationError(
            f"No training examples in {corrections} yet: correct a segmentation and press 'Save as training example'"
        )


@dataclass
class HeldOutComparison:
    """The base model's and an adapter's mean Dice on corrections the adapter was not trained on."""

    names: list[str]  # the held-back examples (corrections-store names)
    base_dice: list[float]
    adapter_dice: list[float]

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def base_mean(self) -> float:
        return float(np.mean(self.base_dice))

    @property
    def adapter_mean(self) -> float:
        return float(np.mean(self.adapter_dice))

    def summary(self) -> str:
        """One line for the widget: both means and the change, in Dice points."""
        change = 100 * (self.adapter_mean - self.base_mean)
        return (
            f"On {self.count} held-back corrections: Dice {100 * self.adapter_mean:.1f} % with this adapter, "
            f"{100 * self.base_mean:.1f} % with the base model ({change:+.1f} points)"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeldOutComparison:
        names, base, adapted = list(data["names"]), list(data["base_dice"]), list(data["adapter_dice"])
        if not names or not len(names) == len(base) == len(adapted):
            raise ValueError("a held-back comparison needs one base and one adapter Dice per example")
        return cls(names, [float(v) for v in base], [float(v) for v in adapted])


def held_out_names(names: Sequence[str], fraction: float = HELD_OUT_FRACTION) -> list[str]:
    """The corrections held back from training: `fraction` of them (at most MAX_HELD_OUT, none below
    MIN_TO_HOLD_OUT), chosen by a hash of the name, so the choice does not depend on the saving order and
    a re-run on the same store holds back the same cases."""
    if not 0.0 <= fraction < 1.0:
        raise AdaptationError(f"the held-back fraction must be in [0, 1), got {fraction}")
    unique = sorted(set(names))
    if len(unique) < MIN_TO_HOLD_OUT or fraction == 0.0:
        return []
    count = min(max(1, round(fraction * len(unique))), MAX_HELD_OUT)
    return sorted(unique, key=lambda name: hashlib.sha256(name.encode("utf-8")).hexdigest())[:count]


def mask_dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; an empty answer to an empty truth is perfect (as evaluate.py counts it)."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def compare_on_held_out(
    base,
    adapted,
    examples: Sequence[tuple[str, np.ndarray, str, np.ndarray]],
    progress: Callable[[int, int], None] | None = None,
    **decoding: Any,
) -> HeldOutComparison:
    """Segment every (name, image, prompt, corrected mask) with both pipelines (MRISPipeline or anything
    with its `segment`) and keep each one's Dice against the correction; `progress(done, total)` after each."""
    names, base_dice, adapter_dice = [], [], []
    for name, image, prompt, mask in examples:
        names.append(name)
        base_dice.append(mask_dice(base.segment(image, prompt, **decoding).mask, mask))
        adapter_dice.append(mask_dice(adapted.segment(image, prompt, **decoding).mask, mask))
        if progress is not None:
            progress(len(names), len(examples))
    if not names:
        raise AdaptationError("no held-back corrections to compare on")
    return HeldOutComparison(names, base_dice, adapter_dice)


def adapter_effect(model_dir: str | Path, name: str) -> str:
    """One line on what adapter `name` does on the user's held-back corrections (what the widget shows
    beside the adapter before the user switches to it), or why there is no such figure."""
    from napari_mris.adapters import adapter_evaluation

    data = adapter_evaluation(model_dir, name)
    if data is None:
        effect = (
            f"{name}: not compared with the base model (no corrections were held back from its training: "
            f"that needs {MIN_TO_HOLD_OUT} or more)"
        )
    else:
        try:
            effect = f"{name}: {HeldOutComparison.from_json(data).summary()}"
        except (KeyError, TypeError, ValueError):
            effect = f"{name}: its stored comparison with the base model is unreadable"
    return effect + border_note(model_dir, name)


def border_note(model_dir: str | Path, name: str) -> str:
    """'' when adapter `name` draws lesion borders at the map's default cut, else a sentence on the border
    it learnt from the corrections (or that its calibration is damaged, which refuses the adapter)."""
    from napari_mris.adapters import adapter_lesion_threshold
    from napari_mris.lesion_snap import LESION_THRESHOLD

    try:
        threshold = adapter_lesion_threshold(model_dir, name)
    except ModelDirectoryError as exc:
        return f"; it cannot be loaded: {exc}"
    if threshold == LESION_THRESHOLD:
        return ""
    way = "tighter" if threshold > LESION_THRESHOLD else "wider"
    return f"; your corrections outline lesions {way} than the model did, and it draws them so (cut {threshold:g})"
