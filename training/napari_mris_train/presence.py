"""`napari-mris-train presence`: calibrate the presence decision (config.json `reject_threshold`).

The model answers "not present" when its p([REJ]) at the decision position is above a threshold. 0.5 (the
more likely of [SOV]/[REJ]) is right only for a model that fits the training prompt mix exactly; a model
trained for an hour on a CPU leaves many absent prompts just under 0.5 (docs/results.md). This command
decodes the referring prompts of a slice of images with every finding decoded (threshold 1.0), then scores
each candidate threshold on the same rows, a finding above it counted as answered "not present" with an
empty mask, and keeps the one with the best **selection score** (full, side and zone Dice and N-Acc:
`evaluate.summarise`, the objective that also chooses checkpoints) among those that answer full
descriptions "not present" no more often than 3 % (issue 15's target) or than 0.5 already does, whichever
is more. Why the ceiling: the selection score alone values a correct "not present" like a whole mask, so
on v5 it chose a cut that said "not present" to one full description in seven (docs/results.md). Ties go
to the threshold nearest 0.5.

Calibrate on images that are not reported: the reported referring figures use the first 300 Val_Folder
images, so the default slice is the next 300. `--write` stores the choice in the model's config.json
(which changes the model's hash). The threshold belongs to the base model, which decides for its adapters too
(pipeline.MRISPipeline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from napari_mris.errors import MRISError
from napari_mris.io.atomic import write_text_atomic
from napari_mris.model.modeldir import update_config
from napari_mris.pipeline import MRISPipeline
from napari_mris_train.evaluate import SELECTION_SETS, evaluate_split, open_split, summarise

CANDIDATES = tuple(float(t) for t in np.round(np.arange(0.05, 0.96, 0.01), 2))
NEVER_REJECT = 1.0  # p([REJ]) > 1 never holds: every finding is decoded


def answered_at(rows: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """The rows of a never-rejecting run as they would be with `threshold`: a finding whose p([REJ]) is above
    it is answered "not present" and draws nothing (so it keeps only its truth's pixels in its counts)."""
    out = []
    for row in rows:
        if row["reject_probability"] > threshold:
            truth_pixels = row["counts"][2]
            row = row | {"rejected": True, "not_present": True, "counts": [0, 0, truth_pixels], "dice": 0.0}
        out.append(row)
    return out


def threshold_table(rows: list[dict[str, Any]], thresholds=CANDIDATES) -> list[dict[str, float]]:
    """Per threshold: the selection score, N-Acc, false "not present" on full descriptions, side Dice."""
    table = []
    for threshold in thresholds:
        report = summarise(answered_at(rows, threshold))
        table.append(
            {
                "threshold": threshold,
                "selection": report["selection"],
                "n_acc": report.get("n_acc"),
                "false_rejection_rate": report.get("false_rejection_rate"),
                "side_dice": report["sets"].get("side", {}).get("dice"),
            }
        )
    return table


def choose(table: list[dict[str, float]], ceiling: float) -> dict[str, float]:
    """The best selection score among the thresholds whose false "not present" rate on full descriptions is
    at most `ceiling`; among equals, the threshold nearest 0.5."""
    allowed = [line for line in table if (line["false_rejection_rate"] or 0.0) <= ceiling + 1e-12]
    return max(allowed, key=lambda line: (round(line["selection"], 9), -abs(line["threshold"] - 0.5)))


def false_rejection_ceiling(rows: list[dict[str, Any]], limit: float) -> float:
    """`limit`, or the rate the plain decision (0.5) already has when that is higher: 0.5 is always allowed."""
    plain = threshold_table(rows, thresholds=(0.5,))[0]["false_rejection_rate"] or 0.0
    return max(limit, plain)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (or 'default')")
    parser.add_argument("--data", required=True, type=Path, help="LViT split folder (or a root: its Val_Folder)")
    parser.add_argument("--order", choices=("raster", "scale"), help="decoding order (default: the model's)")
    parser.add_argument("--start", type=int, default=300, help="first image (default 300: after the reported 300)")
    parser.add_argument("--limit", type=int, default=300, help="number of images (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the referring prompts (as for eval)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", type=Path, help="write the table and the never-rejecting run's rows here")
    parser.add_argument(
        "--max-false-rejections",
        type=float,
        default=0.03,
        help="ceiling on full descriptions answered 'not present' (default 0.03; never below 0.5's own rate)",
    )
    parser.add_argument("--write", action="store_true", help="store the chosen threshold in config.json")


def run(args: argparse.Namespace) -> int:
    try:
        return calibrate_command(args)
    except MRISError as exc:
        print(f"error: {exc}")
        return 1


def calibrate_command(args: argparse.Namespace) -> int:
    pipeline = MRISPipeline.from_pretrained(args.model, device=args.device)
    current = pipeline.reject_threshold
    pipeline.reject_threshold = NEVER_REJECT
    order = args.order or pipeline.default_order
    split = open_split(args.data)
    report = evaluate_split(
        pipeline, split, order=order, limit=args.limit, start=args.start, sets=SELECTION_SETS, seed=args.seed
    )
    table = threshold_table(report["per_prompt"])
    ceiling = false_rejection_ceiling(report["per_prompt"], args.max_false_rejections)
    best = choose(table, ceiling)

    def pct(value: float | None, width: int) -> str:
        return f"{'n/a':>{width}}" if value is None else f"{100 * value:{width - 1}.2f}%"

    print(f"{'threshold':>9} {'selection':>9} {'N-Acc':>7} {'false not present':>17} {'side Dice':>9}")
    for line in table:
        mark = "  <- chosen" if line is best else ("  (current)" if line["threshold"] == current else "")
        if mark or round(100 * line["threshold"]) % 5 == 0:
            print(
                f"{line['threshold']:9.2f} {pct(line['selection'], 9)} {pct(line['n_acc'], 7)} "
                f"{pct(line['false_rejection_rate'], 17)} {pct(line['side_dice'], 9)}{mark}"
            )
    print(f"images {args.start}..{args.start + report['n_images'] - 1} of {split.folder}, order {order}")
    print(f"allowed: false 'not present' on full descriptions at most {100 * ceiling:.2f}%")
    if args.json:
        out = {"model_hash": pipeline.model_hash, "order": order, "start": args.start, "n_images": report["n_images"]}
        out |= {"ceiling": ceiling, "chosen": best, "table": table, "per_prompt": report["per_prompt"]}
        write_text_atomic(args.json, json.dumps(out, indent=2) + "\n")
    if args.write:
        update_config(pipeline.model_dir, reject_threshold=best["threshold"])
        print(f"wrote reject_threshold {best['threshold']:.2f} to {pipeline.model_dir / 'config.json'}")
    return 0
