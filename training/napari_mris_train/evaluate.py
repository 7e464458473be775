"""`napari-mris-train eval`: the referring benchmark on an LViT split (Val_Folder for every reported figure).

Every prompt is decoded through `MRISPipeline.segment_findings` (an image's prompts together, each with the
mask `segment` gives it alone), the same path as the CLI, and scored at its mask's own resolution. The
sets (`referring.py`) ask whether the mask follows the text:

- `full`: Dice / mIoU on the image's own description, and the false-rejection rate (a present finding
  answered "not present");
- `side` / `zone`: Dice against the named part only, beside two references: *text ignored* (the
  full-description mask scored against that part) and *oracle* (that mask cut to the named region);
- `absent`: N-Acc, the fraction answered "not present" (`[REJ]`, or an empty mask);
- `other`: another image's description scored against this image's mask: the drop from `full` says how
  much the text matters.

Every set reports the per-image mean AND the pixel-pooled Dice / IoU (one intersection over the set).
`wording` (`--wording`) puts every prompt inside a sentence, e.g. "Chest X-ray: {} Suspected viral
pneumonia.", so the same sets measure whether the model still follows the text when a radiologist writes
it in their own words; its rows keep the plain prompt's text, so `compare_evals.py` pairs the two runs.
The `selection` score (mean of full, side and zone Dice and N-Acc) is what training keeps checkpoints
by: full descriptions alone reward a model that ignores the text.
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
from napari_mris.findings import MAX_FINDINGS, finding_key
from napari_mris.io.atomic import write_text_atomic
from napari_mris.pipeline import MRISPipeline
from napari_mris_train.data import load_split
from napari_mris_train.metrics import dice_iou, overlap_counts, pooled_dice_iou
from napari_mris_train.referring import KINDS, RESTRICTED, SETS, image_prompts

SELECTION_SETS = ("full", "side", "zone", "absent")


def evaluate_split(
    pipeline: MRISPipeline,
    split,
    *,
    order: str,
    beam: int = 1,
    limit: int | None = None,
    sets: tuple[str, ...] = SETS,
    seed: int = 0,
    progress: bool = True,
    snap: bool = True,
    start: int = 0,
    wording: str = "{}",
) -> dict[str, Any]:
    """Decode the referring prompts of `limit` examples of `split` from index `start` (default: all from the
    first), each put in place of the `{}` of `wording`; metrics and a row per prompt.

    The full description is decoded for every image (the restricted sets' references need its mask) but
    reported only when `full` is among `sets`.
    """
    count = len(split) - start if limit is None else min(limit, len(split) - start)
    if count < 1 or start < 0:
        raise MRISError(
            f"{split.folder}: nothing to evaluate (the split has {len(split)} pairs; start {start}, limit {limit})"
        )
    descriptions = split.descriptions
    rows: list[dict[str, Any]] = []
    began = time.perf_counter()
    for index in tqdm(range(start, start + count), desc=f"eval {order}", disable=not progress, leave=False):
        example = split[index]
        prompts = [
            prompt
            for prompt in image_prompts(descriptions, index, example.mask, seed, ("full", *sets))
            if prompt.set != "full" or "full" in sets
        ]
        worded = {text: wording.replace("{}", text) for text in (example.description, *(p.text for p in prompts))}
        answers = answer_prompts(pipeline, example.image, list(worded.values()), order, beam, snap)
        full_mask = answers[worded[example.description]].mask
        for prompt in prompts:
            rows.append(score_prompt(example.name, prompt, answers[worded[prompt.text]], full_mask))
    return {
        "wording": wording,
        "order": order,
        "snap": snap,
        "beam": beam,
        "start": start,
        "n_images": count,
        "seconds": time.perf_counter() - began,
        **summarise(rows),
        "per_prompt": rows,
    }


def answer_prompts(pipeline, image, texts: list[str], order: str, beam: int, snap: bool) -> dict[str, Any]:
    """Each distinct prompt's result on one image; several are decoded together (`segment_findings`, the
    same masks as one at a time), in runs of at most MAX_FINDINGS."""
    distinct = list({finding_key(text): text for text in reversed(texts)}.values())[::-1]
    results = {}
    for start in range(0, len(distinct), MAX_FINDINGS):
        batch = distinct[start : start + MAX_FINDINGS]
        answers = pipeline.segment_findings(image, batch, order=order, beam=beam, snap=snap)
        results.update(zip(map(finding_key, batch), answers, strict=True))
    return {text: results[finding_key(text)] for text in texts}


def score_prompt(name: str, prompt, result, full_mask: np.ndarray) -> dict[str, Any]:
    """One row: the answer's overlap with the truth (and, for side/zone, both references' overlaps)."""
    dice, iou = dice_iou(result.mask, prompt.truth)
    row = {
        "name": name,
        "set": prompt.set,
        "prompt": prompt.text,
        "dice": dice,
        "iou": iou,
        "counts": overlap_counts(result.mask, prompt.truth),
        "rejected": bool(result.rejected),
        "not_present": result.not_present,
        "reject_probability": result.reject_probability,  # for a presence threshold's trade-off, after the fact
    }
    if prompt.kind is not None:
        row["kind"] = prompt.kind
    if prompt.region is not None:
        row["text_ignored_counts"] = overlap_counts(full_mask, prompt.truth)
        row["oracle_counts"] = overlap_counts(full_mask & prompt.region, prompt.truth)
    return row


def _scores(counts: list[tuple[int, int, int]]) -> dict[str, float]:
    """Per-image mean and pooled Dice / IoU of a list of (intersection, |P|, |T|)."""
    per_image = [_dice_iou_of(c) for c in counts]
    pooled_dice, pooled_iou = pooled_dice_iou(counts)
    return {
        "dice": float(np.mean([d for d, _ in per_image])),
        "miou": float(np.mean([i for _, i in per_image])),
        "pooled_dice": pooled_dice,
        "pooled_miou": pooled_iou,
    }


def _dice_iou_of(counts: tuple[int, int, int]) -> tuple[float, float]:
    return pooled_dice_iou([counts])  # one image pooled alone is its own Dice / IoU


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-set figures, the full-description headline (`dice`, `miou`) and the selection score."""
    sets: dict[str, dict[str, Any]] = {}
    for name in SETS:
        chosen = [r for r in rows if r["set"] == name]
        if not chosen:
            continue
        summary = {"n": len(chosen), "not_present": float(np.mean([r["not_present"] for r in chosen]))}
        summary["rejected"] = float(np.mean([r["rejected"] for r in chosen]))
        if name != "absent":  # an empty truth has no Dice worth averaging: N-Acc says it
            summary |= _scores([tuple(r["counts"]) for r in chosen])
        if name in KINDS:  # "not present" per kind of prompt (rows of older runs carry no kind)
            summary["by_kind"] = {
                kind: {"n": len(part), "not_present": float(np.mean([r["not_present"] for r in part]))}
                for kind in KINDS[name]
                if (part := [r for r in chosen if r.get("kind") == kind])
            }
        if name in RESTRICTED:
            summary["text_ignored"] = _scores([tuple(r["text_ignored_counts"]) for r in chosen])
            summary["oracle"] = _scores([tuple(r["oracle_counts"]) for r in chosen])
            summary["of_oracle"] = summary["dice"] / max(summary["oracle"]["dice"], 1e-9)
        sets[name] = summary
    report: dict[str, Any] = {"sets": sets}
    if "full" in sets:
        report |= {"dice": sets["full"]["dice"], "miou": sets["full"]["miou"]}
        report["false_rejection_rate"] = sets["full"]["not_present"]
        if "other" in sets:
            names = {r["name"] for r in rows if r["set"] == "other"}
            paired = [r["dice"] for r in rows if r["set"] == "full" and r["name"] in names]
            report["other_text_drop"] = float(np.mean(paired)) - sets["other"]["dice"]
    if "absent" in sets:
        report["n_acc"] = sets["absent"]["not_present"]
    parts = [sets[s]["dice"] for s in ("full", "side", "zone") if s in sets]
    parts += [report["n_acc"]] if "n_acc" in report else []
    report["selection"] = float(np.mean(parts)) if parts else None
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain table: one line per set and reference, then the summary figures."""

    def pct(value: float | None) -> str:
        return "    n/a" if value is None else f"{100 * value:6.2f}%"

    lines = [
        f"images {report['n_images']}  order {report['order']}  beam {report['beam']}  snap {report['snap']}  "
        f"({report['seconds']:.0f} s)" + ("" if report.get("wording", "{}") == "{}" else f"  {report['wording']!r}"),
        f"{'set':<22}{'n':>6}  {'Dice':>7}  {'mIoU':>7}  {'pooled Dice':>11}  {'pooled mIoU':>11}  {'not present':>11}",
    ]
    for name, summary in report["sets"].items():
        rows = [(name, summary)]
        if name in RESTRICTED:
            rows += [("  text ignored", summary["text_ignored"]), ("  oracle", summary["oracle"])]
        for label, s in rows:
            n = f"{summary['n']:>6}" if label == name else " " * 6
            present = f"{pct(summary['not_present']):>11}" if label == name else ""
            lines.append(
                f"{label:<22}{n}  {pct(s.get('dice')):>7}  {pct(s.get('miou')):>7}  "
                f"{pct(s.get('pooled_dice')):>11}  {pct(s.get('pooled_miou')):>11}  {present}"
            )
    split_by_kind = {"false_rejection_rate": "full", "n_acc": "absent"}  # figure -> the set it is the rate of
    for key, label in (
        ("false_rejection_rate", "false rejections (full)"),
        ("n_acc", "N-Acc (absent)"),
        ("other_text_drop", "Dice drop, other text"),
        ("selection", "selection score"),
    ):
        if report.get(key) is None:
            continue
        lines.append(f"{label:<28}{pct(report[key])}")
        for kind, part in report["sets"][split_by_kind[key]]["by_kind"].items() if key in split_by_kind else ():
            label = f"  {kind.replace('_', ' ')} (n = {part['n']})"
            lines.append(f"{label:<28}{pct(part['not_present'])}")
    for name in RESTRICTED:
        if name in report["sets"]:
            lines.append(f"{name + ' Dice / oracle':<28}{pct(report['sets'][name]['of_oracle'])}")
    return "\n".join(lines)


def parse_sets(text: str) -> tuple[str, ...]:
    sets = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(set(sets) - set(SETS))
    if unknown or not sets:
        raise argparse.ArgumentTypeError(f"--sets takes a comma list of {', '.join(SETS)}; got {text!r}")
    return sets


def parse_wording(text: str) -> str:
    if text.count("{}") != 1:
        raise argparse.ArgumentTypeError(f"--wording needs one '{{}}' where the prompt goes; got {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (or 'default')")
    parser.add_argument("--data", required=True, type=Path, help="LViT split folder (or a root: its Val_Folder)")
    parser.add_argument("--json", type=Path, help="write the metrics (and one row per prompt) here")
    parser.add_argument("--order", choices=("raster", "scale"), help="decoding order (default: the model's)")
    parser.add_argument("--beam", type=int, default=1, help="beam width (1 = greedy)")
    parser.add_argument("--limit", type=int, help="evaluate only N images (the first N, or from --start)")
    parser.add_argument("--start", type=int, default=0, help="the first image's index (default 0)")
    parser.add_argument(
        "--sets",
        type=parse_sets,
        default=SETS,
        help=f"comma list of referring sets (default all: {','.join(SETS)}); 'full' alone is plain Dice",
    )
    parser.add_argument(
        "--wording",
        type=parse_wording,
        default="{}",
        help="a sentence every prompt is put into at its '{}' (free wording; default: the prompt alone)",
    )
    parser.add_argument("--adapter", help="a LoRA adapter of the model directory (adapters/<name>)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed for the zone, absent and other-text prompts")
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
        sets=args.sets,
        seed=args.seed,
        snap=not args.no_snap,
        start=args.start,
        wording=args.wording,
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
