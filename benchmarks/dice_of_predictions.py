"""An independent Dice check: `napari-mris predict` output against an LViT split's ground truth.

Reads `OUT/mask_<stem>.png` (written by `napari-mris predict SPLIT --out OUT`) and `SPLIT/labelcol/
mask_<stem>.png` with Pillow and computes per-image Dice and IoU with plain numpy, sharing no code with
the project's evaluation, so that it can confirm the model card's figure.

    napari-mris predict ../shared/data/QaTa-COV19/Val_Folder --out runs/val_pred
    python benchmarks/dice_of_predictions.py runs/val_pred ../shared/data/QaTa-COV19/Val_Folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def binary(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, help="the --out folder of napari-mris predict")
    parser.add_argument("split", type=Path, help="the LViT split folder with labelcol/")
    args = parser.parse_args()
    truth = {p.name.lower(): p for p in (args.split / "labelcol").iterdir() if p.suffix.lower() == ".png"}
    predictions = {p.name.lower(): p for p in args.predictions.iterdir() if p.suffix.lower() == ".png"}
    dice, iou, missing = [], [], []
    for name, truth_path in sorted(truth.items()):
        if name not in predictions:
            missing.append(name)
            continue
        p, t = binary(predictions[name]), binary(truth_path)
        inter, total = np.logical_and(p, t).sum(), p.sum() + t.sum()
        dice.append(1.0 if total == 0 else 2 * inter / total)
        iou.append(1.0 if total == 0 else inter / (total - inter))
    if not dice:
        print(f"no prediction in {args.predictions} matches a mask in {args.split / 'labelcol'}")
        return 1
    print(f"images {len(dice)}  Dice {100 * np.mean(dice):.2f} %  mIoU {100 * np.mean(iou):.2f} %")
    if missing:
        print(f"{len(missing)} ground-truth masks had no prediction, e.g. {missing[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
