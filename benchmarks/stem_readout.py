"""What the pixel stem alone sees: Dice of a model's text-free lesion read-out on a validation split.

The U-Net stem's lesion map is fitted to the mask in training and in the stem warm-up (losses.lesion_loss).
Thresholding its sigmoid at 0.5, upsampled bilinearly from its grid to the mask's own resolution, gives
a text-free segmentation: a measure of the stem's image understanding, which bounds what
the mask tokens can draw. Scored with the same per-image metric code as `napari-mris-train eval`.

    python benchmarks/stem_readout.py --model src/napari_mris/models/default --data ../shared/data/QaTa-COV19
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from napari_mris.model.decoder_files import load_decoder
from napari_mris.model_location import resolve_model_dir
from napari_mris.tokenizers.preprocess import to_model_image
from napari_mris_train.data import load_split
from napari_mris_train.metrics import dice_iou


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model directory (or 'default')")
    parser.add_argument("--data", required=True, help="LViT root (its Val_Folder is used)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N validation pairs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    decoder, _ = load_decoder(model_dir)
    size = int(json.loads((model_dir / "config.json").read_text())["image_size"])
    split = load_split(args.data, split="val")
    count = len(split) if args.limit is None else min(args.limit, len(split))
    scores = []
    with torch.no_grad():
        for i in tqdm(range(count), desc="stem read-out", mininterval=5):
            example = split[i]
            pixels = torch.from_numpy(np.ascontiguousarray(to_model_image(example.image, None, size)))[None, None]
            prob = torch.sigmoid(decoder.lesion_logits(pixels))
            prob = F.interpolate(prob, size=example.mask.shape, mode="bilinear", align_corners=False)
            scores.append(dice_iou(prob[0, 0].numpy() > 0.5, example.mask))
    dice, iou = (float(np.mean(values)) for values in zip(*scores, strict=True))
    print(f"lesion read-out alone, {count} images: Dice {100 * dice:.2f} %, mIoU {100 * iou:.2f} %")


if __name__ == "__main__":
    main()
