"""`napari-mris-train domain`: fit and calibrate the domain guard of a model directory (`domain.safetensors`).

Statistics come from the training split (plus the training splits of `--extra-train` roots, as in `train
--extra-train`: the default model also trained on synthetic phantoms, which its sample images are), the
threshold from the validation split of `--data`: the smallest score that flags at most `--false-alarms` of
its images (1 % by default), so the threshold is set on images the statistics never saw. Every slice goes
through the runtime's own reading and preprocessing (`read_slice`, `to_model_image`), so the scores here are
the scores the pipeline computes. Only the pixel stem's encoder is run: the file stays valid for a model
whose token decoder is retrained with the stem frozen (the runtime checks the stem's weights digest
recorded here).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_mris.domain import DomainGuard, stem_digest, stem_features
from napari_mris.errors import MRISError
from napari_mris.io import read_slice
from napari_mris.model.decoder_files import load_decoder
from napari_mris.model.modeldir import read_config
from napari_mris.tokenizers.preprocess import to_model_image
from napari_mris_train.cli import add_training_data

DEFAULT_FALSE_ALARMS = 0.01
# Covariance shrinkage towards the mean variance; docs/results.md ("Domain guard") shows 0.001..0.03.
DEFAULT_SHRINKAGE = 0.01
BATCH = 32
TIE_MARGIN = 1e-4  # relative margin above the highest score when no false alarm is allowed


def model_images(paths: list[Path], size: int) -> Iterator[torch.Tensor]:
    """(B, 1, size, size) batches of the slices at `paths`, preprocessed as the pipeline does."""
    for start in range(0, len(paths), BATCH):
        images = []
        for path in paths[start : start + BATCH]:
            image = read_slice(path, expect_2d=True)
            images.append(to_model_image(image.pixels, image.window, size))
        yield torch.from_numpy(np.stack(images))[:, None]


def features_of(stem: torch.nn.Module, paths: list[Path], size: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([stem_features(stem, batch) for batch in model_images(paths, size)])


def calibrate_threshold(scores: torch.Tensor, false_alarms: float) -> float:
    """A threshold that flags at most `false_alarms` of `scores` (flagged = score > threshold): halfway between
    the highest score it passes and the lowest it flags, so that the last digits of a score computed another
    way (one image instead of a batch) cannot move an image across it."""
    if not 0.0 <= false_alarms < 1.0:
        raise ValueError(f"false_alarms must be in [0, 1), got {false_alarms}")
    ordered = torch.sort(scores.double()).values
    allowed = math.floor(false_alarms * len(ordered))
    passed = float(ordered[len(ordered) - 1 - allowed])
    if allowed == 0:
        return passed + TIE_MARGIN * max(abs(passed), 1.0)
    return (passed + float(ordered[len(ordered) - allowed])) / 2


def fit_domain_guard(
    model_dir: Path,
    train_paths: list[Path],
    val_paths: list[Path],
    *,
    false_alarms: float = DEFAULT_FALSE_ALARMS,
    shrinkage: float = DEFAULT_SHRINKAGE,
    sources: dict[str, Any] | None = None,
) -> tuple[DomainGuard, torch.Tensor]:
    """Fit on `train_paths`, calibrate on `val_paths`; returns the guard and the validation scores."""
    if len(train_paths) < 2 or not val_paths:
        raise MRISError(f"need training and validation images, got {len(train_paths)} and {len(val_paths)}")
    decoder, _ = load_decoder(model_dir)
    stem = decoder.pixel_stem
    if stem is None:
        raise MRISError(f"{model_dir}: the decoder has no pixel stem, whose features the domain guard scores")
    size = int(read_config(model_dir)["image_size"])
    guard = DomainGuard.fit(features_of(stem, train_paths, size), shrinkage)
    val_scores = guard.scores(features_of(stem, val_paths, size))
    guard.threshold = calibrate_threshold(val_scores, false_alarms)
    flagged = int((val_scores > guard.threshold).sum())
    guard.info.update(
        sources or {},
        n_train=len(train_paths),
        n_val=len(val_paths),
        false_alarm_target=false_alarms,
        val_flagged=flagged,
        val_score_quantiles={str(q): round(float(torch.quantile(val_scores.double(), q)), 3) for q in (0.5, 0.99, 1.0)},
        stem_sha256=stem_digest(stem),
        model_id=str(read_config(model_dir).get("model_id", "")),
    )
    return guard, val_scores


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="the model directory (domain.safetensors goes here)")
    add_training_data(
        parser, "another LViT root whose Train_Folder the model also trained on (repeatable); statistics only"
    )
    parser.add_argument(
        "--false-alarms", type=float, default=DEFAULT_FALSE_ALARMS, help="fraction of Val_Folder allowed to be flagged"
    )
    parser.add_argument("--shrinkage", type=float, default=DEFAULT_SHRINKAGE, help="covariance shrinkage (0..1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    from napari_mris_train.data import load_split

    torch.set_num_threads(max(1, args.threads))
    start = time.perf_counter()
    try:
        train = load_split(args.data, split="train")
        val = load_split(args.data, split="val")
        extra = [load_split(root, split="train") for root in args.extra_train]
        train_paths = [pair[1] for split in (train, *extra) for pair in split.pairs]
        guard, scores = fit_domain_guard(
            args.model,
            train_paths,
            [pair[1] for pair in val.pairs],
            false_alarms=args.false_alarms,
            shrinkage=args.shrinkage,
            sources={
                "train": [f"{split.folder} ({len(split)})" for split in (train, *extra)],
                "val": f"{val.folder} ({len(val)})",
            },
        )
        path = guard.save(args.model)
    except (MRISError, OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    flagged = int((scores > guard.threshold).sum())
    print(
        f"wrote {path}: threshold {guard.threshold:.3f}, {flagged}/{len(scores)} validation images flagged "
        f"({100.0 * flagged / len(scores):.2f} %), {len(train_paths)} training images, "
        f"{time.perf_counter() - start:.0f} s"
    )
    return 0
