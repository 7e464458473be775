"""Adapt a model to the user's corrections: LoRA fine-tuning run as a child process.

The runtime never imports the training package; it starts `python -m napari_mris_train.cli finetune`
and reads the `step I/N loss L` lines that `--report-steps` prints. A separate process also means a
crash or an out-of-memory kill in training can never take napari (and the user's labels) down, and Stop
is a plain terminate. The child writes the adapter by renaming a finished temporary folder, so a stopped
or failed run leaves the model directory exactly as it was, and the base weights are never written.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from napari_mris.errors import MRISError

STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss ([-+0-9.eEnaif]+)$")
ADAPTER_LINE = re.compile(r"^adapter saved: (.+)$")
DEFAULT_STEPS = 200
REPLAY_PHANTOMS = 64  # without a replay dataset: synthetic phantoms, part of the default model's training data


class AdaptationError(MRISError):
    """Fine-tuning could not start or did not finish; the active model is unchanged."""


@dataclass
class AdaptProgress:
    step: int
    total: int
    loss: float


@dataclass
class AdaptationJob:
    """One `finetune` run: `run()` yields progress and returns the adapter's name; `stop()` ends it."""

    model_dir: Path
    corrections: Path
    name: str
    steps: int = DEFAULT_STEPS
    replay_data: Path | None = None
    device: str = "auto"
    process: subprocess.Popen | None = None
    stopped: bool = False

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "napari_mris_train.cli", "finetune", "--model", str(self.model_dir)]
        args += ["--data", str(self.corrections), "--out", self.name, "--steps", str(self.steps)]
        args += ["--device", self.device, "--report-steps"]
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
        for line in self.process.stdout:
            line = line.strip()
            if match := STEP_LINE.match(line):
                yield AdaptProgress(int(match[1]), int(match[2]), float(match[3]))
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
