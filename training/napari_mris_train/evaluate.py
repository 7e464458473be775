"""`napari-mris-train eval`: Dice, mIoU, text dependence and [REJ] accuracy on an LViT split.

Every image is decoded through `MRISPipeline.segment`, the same path as the widget and the CLI, and
scored at its mask's own resolution (per-image Dice and IoU, then the mean). Three questions, three runs:

- the right description: Dice / mIoU and the false-rejection rate (a present target answered `[REJ]`);
- another image's (different) description: Dice again; the drop says how much the text matters;
- a constructed absent-target prompt (zones with no lesion): N-Acc, the fraction answered `[REJ]`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from napari_mris.errors import MRISError
from napari_mris.io.atomic import write_text_atomic
from napari_mris.pipeline import MRISPipeline
from napari_mris_train.data import load_split
from napari_mris_train.metrics import RunningMean, dice_iou
from napari_mris_train.prompts import absent_target

SHUFFLE_TRIES = 32


def other_description(descriptions: list[str], index: int, rng: np.random.Generator) -> str | None:
    """A description of another image that differs from this one's text (templates repeat a lot)."""
    for _ in range(SHUFFLE_TRIES):
        j = int(rng.integers(len(descriptions)))
        if j != index and descriptions[j].strip().lower() != descriptions[index].strip().lower():
            return descriptions[j]
    return None


def evaluate_split(
    pipeline: MRISPipeline,
    split,
    *,
    order: str,
    beam: int = 1,
    limit: int | None = None,
    shuffled: bool = True,
    absent: bool = True,
    seed: int = 0,
    progress: bool = True,
    snap: bool = True,
) -> dict[str, Any]:
    """Decode the first `limit` examples of `split` and return the metrics (and a row per image)."""
    count = len(split) if limit is None else min(limit, len(split))
    if count < 1:
        raise MRISError(f"{split.folder}: nothing to evaluate (the split has {len(split)} pairs, limit {limit})")
    rng = np.random.default_rng(seed)
    descriptions = split.descriptions
    dice, iou, shuffled_dice, n_acc, rejected = RunningMean(), RunningMean(), RunningMean(), RunningMean(), 0
    rows = []
    start = time.perf_counter()
    for index in tqdm(range(count), desc=f"eval {order}", disable=not progress, leave=False):
        example = split[index]
        result = pipeline.segment(example.image, example.description, order=order, beam=beam, snap=snap)
        d, i = dice_iou(result.mask, example.mask)
        dice.add(d)
        iou.add(i)
        rejected += int(result.rejected)
        row = {"name": example.name, "dice": d, "iou": i, "rejected": bool(result.rejected)}
        if shuffled and (text := other_description(descriptions, index, rng)) is not None:
            other = pipeline.segment(example.image, text, order=order, beam=beam, snap=snap)
            row["shuffled_dice"] = dice_iou(other.mask, example.mask)[0]
            shuffled_dice.add(row["shuffled_dice"])
        if absent and (text := absent_target(example.mask, rng)) is not None:
            row["absent_rejected"] = bool(
                pipeline.segment(example.image, text, order=order, beam=beam, snap=snap).rejected
            )
            n_acc.add(row["absent_rejected"])
        rows.append(row)
    seconds = time.perf_counter() - start
    report = {
        "order": order,
        "snap": snap,
        "beam": beam,
        "n_images": count,
        "dice": dice.mean,
        "miou": iou.mean,
        "false_rejection_rate": rejected / count,
        "shuffled_dice": shuffled_dice.mean if len(shuffled_dice) else None,
        "n_shuffled": len(shuffled_dice),
        "n_acc": n_acc.mean if len(n_acc) else None,
        "n_absent": len(n_acc),
        "seconds": seconds,
        "per_image": rows,
    }
    if report["shuffled_dice"] is not None:
        report["dice_drop_shuffled"] = report["dice"] - report["shuffled_dice"]
    return report


def format_table(report: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:6.2f} %"

    lines = [
        f"images            {report['n_images']}  (order {report['order']}, beam {report['beam']})",
        f"Dice              {pct(report['dice'])}",
        f"mIoU              {pct(report['miou'])}",
        f"false rejections  {pct(report['false_rejection_rate'])}",
        f"Dice, other text  {pct(report['shuffled_dice'])}  ({report['n_shuffled']} images)",
        f"N-Acc (absent)    {pct(report['n_acc'])}  ({report['n_absent']} prompts)",
        f"time              {report['seconds']:.1f} s",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (or 'default')")
    parser.add_argument("--data", required=True, type=Path, help="LViT split folder (or a root: its Val_Folder)")
    parser.add_argument("--json", type=Path, help="write the metrics (and one row per image) here")
    parser.add_argument("--order", choices=("raster", "scale"), help="decoding order (default: scale if present)")
    parser.add_argument("--beam", type=int, default=1, help="beam width (1 = greedy)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N pairs")
    parser.add_argument("--adapter", help="a LoRA adapter of the model directory (adapters/<name>)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed for the shuffled and absent-target prompts")
    parser.add_argument("--no-shuffle", action="store_true", help="skip the other-description run")
    parser.add_argument("--no-absent", action="store_true", help="skip the absent-target run")
    parser.add_argument(
        "--no-snap", action="store_true", help="the token mask as decoded, not snapped to the lesion map"
    )


def open_split(path: Path):
    """A split folder as given, or the validation split of an LViT root."""
    if not path.is_dir() or any(p.is_dir() and p.name.lower() == "img" for p in path.iterdir()):
        return load_split(path)
    return load_split(path, split="val")


def run(args: argparse.Namespace) -> int:
    try:
        return evaluate_command(args)
    except MRISError as exc:  # model directory, adapter, dataset or device problems, in plain words
        print(f"error: {exc}")
        return 1


def evaluate_command(args: argparse.Namespace) -> int:
    pipeline = MRISPipeline.from_pretrained(args.model, device=args.device, adapter=args.adapter)
    order = args.order or pipeline.default_order
    split = open_split(args.data)
    report = evaluate_split(
        pipeline,
        split,
        order=order,
        beam=args.beam,
        limit=args.limit,
        shuffled=not args.no_shuffle,
        absent=not args.no_absent,
        seed=args.seed,
        snap=not args.no_snap,
    )
    report = {
        "model": str(pipeline.model_dir),
        "model_hash": pipeline.model_hash,
        "adapter": args.adapter,
        "data": str(split.folder),
        **report,
    }
    print(format_table(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0
