"""What the pixel stem alone sees: Dice of a model's text-free lesion read-out on a validation split, and
how often it marks the lesion-free lung of a one-sided case.

The U-Net stem's lesion map is fitted to the mask in training and in the stem warm-up (losses.lesion_loss).
Thresholding its sigmoid at 0.5, upsampled bilinearly from its grid to the mask's own resolution, gives
a text-free segmentation: a measure of the stem's image understanding, which bounds what
the mask tokens can draw. Scored with the same per-image metric code as `napari-mris-train eval`.

The second figure explains the absent prompts that name a lesion-free lung (N-Acc "empty lung",
`napari-mris-train eval`): on every case whose mask lies on one side of the midline only
(`prompts.side_columns`), it counts how often the map marks the other, lesion-free half (any pixel at
>= 0.5, and at least MARKED_PIXELS of them) and how much it marks there. A prompt for that half can only be
answered "not present" by reading past what the map sees. `--with-text` decodes each such case's own
description through the pipeline and measures the same on its final mask (what the text removes), and
`--unet DIR` the same for a text-free U-Net peer's checkpoint (`benchmarks/unet_baseline.py --out DIR`:
DIR/checkpoint).

The third figure bounds what a decision can get from such a read-out: over every half of every image, how
well the highest lesion probability in a half tells the halves without a mask pixel from those with one
(the AUC), and the share of lesion-free halves whose peak lies below all but MAX_FALSE_EMPTY of the lesion
halves' peaks: the lesion-free lungs a decision reading the peak could answer "not present" while saying
so of at most 3 % of the lungs with a lesion (issue 15's bound on false "not present" answers).

    python benchmarks/stem_readout.py --model src/napari_mris/models/default --data ../shared/data/QaTa-COV19
    python benchmarks/stem_readout.py --data ../shared/data/QaTa-COV19 --start 300 --limit 300 --with-text \\
        --unet runs/unet224_131
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu
from tqdm import tqdm

from napari_mris.model.decoder_files import load_decoder
from napari_mris.model_location import resolve_model_dir
from napari_mris.tokenizers.preprocess import to_model_image
from napari_mris_train.checkpoint import CheckpointError, load_checkpoint, part
from napari_mris_train.data import load_split
from napari_mris_train.metrics import dice_iou
from napari_mris_train.prompts import side_columns

MARKED_PIXELS = 500  # about 2 % of a 224 px image's half: a lesion a reader would see, not a stray pixel
MAX_FALSE_EMPTY = 0.03  # issue 15: at most 3 % of present findings answered "not present"


def lesion_free_half(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The index of the half (split at the midline) without a mask pixel, when the other half has one."""
    halves = [(slice(None), columns) for columns in side_columns(mask.shape[1]).values()]
    empty = [half for half in halves if not mask[half].any()]
    return empty[0] if len(empty) == 1 else None


def half_marks(masks: list[tuple[np.ndarray, tuple[slice, slice]]]) -> dict[str, float]:
    """Over (prediction, lesion-free half) pairs: the share marked at all, the share with at least
    MARKED_PIXELS there, and the mean number of pixels marked there."""
    pixels = np.array([int(mask[half].sum()) for mask, half in masks], float)
    return {
        "marked": float((pixels > 0).mean()),
        "marked_500": float((pixels >= MARKED_PIXELS).mean()),
        "mean_pixels": float(pixels.mean()),
    }


def half_peaks(prob: np.ndarray, mask: np.ndarray) -> list[tuple[float, bool]]:
    """(the highest probability in the half, whether the mask leaves it lesion-free) for each half."""
    halves = side_columns(mask.shape[1]).values()
    return [(float(prob[:, columns].max()), not mask[:, columns].any()) for columns in halves]


def lesion_free_separation(peaks: list[tuple[float, bool]]) -> dict[str, float]:
    """How well a low peak marks a lesion-free half: the AUC (Mann-Whitney U over the two groups) and the
    share of lesion-free halves strictly below the MAX_FALSE_EMPTY quantile of the lesion halves' peaks."""
    values = np.array([peak for peak, _ in peaks])
    free = np.array([lesion_free for _, lesion_free in peaks])
    if free.all() or not free.any():
        raise ValueError("the separation needs halves with and without a lesion")
    u = mannwhitneyu(values[~free], values[free]).statistic  # lesion halves ranked above lesion-free ones
    cut = np.quantile(values[~free], MAX_FALSE_EMPTY)
    return {"auc": float(u / (free.sum() * (~free).sum())), "caught": float((values[free] < cut).mean())}


def load_unet(folder: Path):
    """A unet_baseline.py run's U-Net (its checkpoint: the state at the last save) and its input size."""
    sys.path.insert(0, str(Path(__file__).parent))
    from unet_baseline import UNet  # the benchmark's own model; benchmarks/ is not a package

    tensors, info = load_checkpoint(folder / "checkpoint")
    model = UNet(tuple(info["recipe"]["widths"]))
    model.load_state_dict(part(tensors, "model"))
    return model.eval(), int(info["recipe"]["size"]), int(info["steps"])


def unet_probability(model, size: int, image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The U-Net's lesion probabilities at the truth's size, as unet_baseline.py scores it (pixels / 255,
    area-resized, its `probabilities`; its mask is these at 0.5)."""
    from unet_baseline import probabilities  # on sys.path since load_unet

    x = torch.from_numpy(image.astype(np.float32) / 255.0)[None, None]
    return probabilities(model, F.interpolate(x, size=(size, size), mode="area"), out_size=shape)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model directory (or 'default')")
    parser.add_argument("--data", required=True, help="LViT root (its Val_Folder is used)")
    parser.add_argument("--start", type=int, default=0, help="the first validation pair")
    parser.add_argument("--limit", type=int, default=None, help="only N validation pairs from --start")
    parser.add_argument("--with-text", action="store_true", help="also each one-sided case's own description")
    parser.add_argument("--unet", type=Path, help="also a unet_baseline.py run folder (its checkpoint)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    decoder, _ = load_decoder(model_dir)
    size = int(json.loads((model_dir / "config.json").read_text())["image_size"])
    pipeline = None
    if args.with_text:
        from napari_mris.pipeline import MRISPipeline

        pipeline = MRISPipeline.from_pretrained(model_dir)
    try:
        unet = load_unet(args.unet) if args.unet else None
    except CheckpointError as exc:
        raise SystemExit(f"--unet {args.unet}: {exc}") from None
    split = load_split(args.data, split="val")
    stop = len(split) if args.limit is None else min(args.start + args.limit, len(split))
    scores, marks = [], {"map": [], "text": [], "unet": []}
    peaks = {"map": [], "unet": []}
    with torch.no_grad():
        for i in tqdm(range(args.start, stop), desc="stem read-out", mininterval=5):
            example = split[i]
            pixels = torch.from_numpy(np.ascontiguousarray(to_model_image(example.image, None, size)))[None, None]
            prob = torch.sigmoid(decoder.lesion_logits(pixels))
            prob = F.interpolate(prob, size=example.mask.shape, mode="bilinear", align_corners=False)
            prob = prob[0, 0].numpy()
            truth = example.mask > 0
            scores.append(dice_iou(prob > 0.5, example.mask))
            peaks["map"] += half_peaks(prob, truth)
            if unet is not None:
                unet_prob = unet_probability(unet[0], unet[1], example.image, example.mask.shape)
                peaks["unet"] += half_peaks(unet_prob, truth)
            half = lesion_free_half(truth)
            if half is None:
                continue
            marks["map"].append((prob > 0.5, half))
            if pipeline is not None:
                marks["text"].append((pipeline.segment(example.image, example.description).mask, half))
            if unet is not None:
                marks["unet"].append((unet_prob > 0.5, half))
    dice, iou = (float(np.mean(values)) for values in zip(*scores, strict=True))
    print(f"lesion read-out alone, {len(scores)} images: Dice {100 * dice:.2f} %, mIoU {100 * iou:.2f} %")
    names = {
        "map": "the lesion map (text-free)",
        "text": "the final mask of the case's own description",
        "unet": f"the U-Net peer ({unet[2]} steps)" if unet else "",
    }
    count = len(marks["map"])
    print(f"one-sided cases: {count}; on the lesion-free half (>= {MARKED_PIXELS} px: a visible mark):")
    for key, pairs in marks.items():
        if pairs:
            m = half_marks(pairs)
            print(
                f"  {names[key]}: marks it in {100 * m['marked']:.1f} % ({100 * m['marked_500']:.1f} % with >= "
                f"{MARKED_PIXELS} px), {m['mean_pixels']:.0f} px on average"
            )
    free = sum(lesion_free for _, lesion_free in peaks["map"])
    if free in (0, len(peaks["map"])):
        print(f"all {len(peaks['map'])} halves, {free} lesion-free: no lesion-free test without both kinds of half")
        return
    print(
        f"all {len(peaks['map'])} halves, {free} lesion-free: the half's peak probability as a lesion-free test "
        f"(caught: lesion-free halves below all but {100 * MAX_FALSE_EMPTY:.0f} % of the lesion halves' peaks):"
    )
    for key, values in peaks.items():
        if values:
            sep = lesion_free_separation(values)
            print(f"  {names[key]}: AUC {sep['auc']:.3f}, caught {100 * sep['caught']:.1f} %")


if __name__ == "__main__":
    main()
