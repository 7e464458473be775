"""Segmentation metrics as LViT and NTP-MRISeg report them: per-image Dice and IoU, then the mean.

An empty prediction on an empty ground truth is a perfect answer (Dice = IoU = 1), not 0/0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def dice_iou(prediction: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks of the same shape."""
    inter, predicted, true = overlap_counts(prediction, target)
    total = predicted + true
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


def overlap_counts(prediction: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """(|P & T|, |P|, |T|) of two boolean masks: what a per-image and a pooled score are made of."""
    prediction, target = np.asarray(prediction, bool), np.asarray(target, bool)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {target.shape} differ in shape")
    return int(np.logical_and(prediction, target).sum()), int(prediction.sum()), int(target.sum())


def pooled_dice_iou(counts: list[tuple[int, int, int]]) -> tuple[float, float]:
    """Dice and IoU of a whole split pooled into one intersection and one union (the figure many
    QaTa-COV19 papers report; it weighs large lesions more and runs several points above the per-image
    mean). Empty predictions on empty truths everywhere count as perfect, as in `dice_iou`."""
    inter = sum(c[0] for c in counts)
    total = sum(c[1] + c[2] for c in counts)
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / (total - inter)
