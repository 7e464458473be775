"""Segmentation metrics as LViT and NTP-MRISeg report them: per-image Dice and IoU, then the mean.

An empty prediction on an empty ground truth is a perfect answer (Dice = IoU = 1), not 0/0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def dice_iou(prediction: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks of the same shape."""
    prediction, target = np.asarray(prediction, bool), np.asarray(target, bool)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {target.shape} differ in shape")
    inter = int(np.logical_and(prediction, target).sum())
    total = int(prediction.sum()) + int(target.sum())
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / (total - inter)


@dataclass
class RunningMean:
    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(float(value))

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    def __len__(self) -> int:
        return len(self.values)
