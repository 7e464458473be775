"""Render the figures of docs/results.md from a model and an LViT validation split.

- `val_cases.png`: validation cases, one row each: image with its description, ground truth, prediction
  (Dice in the title). Cases are picked at evenly spaced Dice quantiles of an eval JSON when one is given
  (`napari-mris-train eval --json`), so the figure shows typical, good and bad cases, not just the best.
- `coarse_to_fine.png`: the masks the widget shows while the next-scale order streams one case.

    python scripts/render_results.py --model src/napari_mris/models/default \\
        --data ../shared/data/QaTa-COV19/Val_Folder --eval-json runs/eval_default.json --out docs/img
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from napari_mris.pipeline import MRISPipeline  # noqa: E402
from napari_mris_train.data import load_split  # noqa: E402
from napari_mris_train.metrics import dice_iou  # noqa: E402


def pick_cases(split, eval_json: Path | None, count: int) -> list[int]:
    """Indices at evenly spaced Dice quantiles (worst to best), or the first `count` without an eval."""
    if eval_json is None:
        return list(range(min(count, len(split))))
    rows = [r for r in json.loads(eval_json.read_text())["per_prompt"] if r["set"] == "full"]
    index_of = {name: i for i, name in enumerate(split.names)}
    ranked = sorted((r["dice"], index_of[r["name"]]) for r in rows if r["name"] in index_of and not r["rejected"])
    positions = np.linspace(0, len(ranked) - 1, count).round().astype(int)
    return [ranked[p][1] for p in positions]


def render_cases(pipeline: MRISPipeline, split, indices: list[int], order: str, path: Path) -> None:
    fig, axes = plt.subplots(len(indices), 3, figsize=(7.5, 2.6 * len(indices)), squeeze=False)
    for row, index in zip(axes, indices, strict=True):
        example = split[index]
        result = pipeline.segment(example.image, example.description, order=order)
        dice = dice_iou(result.mask, example.mask)[0]
        row[0].imshow(example.image, cmap="gray")
        row[0].set_title("\n".join(textwrap.wrap(example.description, 42)), fontsize=7, loc="left")
        row[1].imshow(example.mask, cmap="gray")
        row[1].set_title("ground truth", fontsize=8)
        row[2].imshow(example.image, cmap="gray")
        row[2].imshow(np.ma.masked_where(~result.mask, result.mask), cmap="autumn", alpha=0.6)
        row[2].set_title("[REJ]: not found" if result.rejected else f"prediction, Dice {100 * dice:.1f} %", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_coarse_to_fine(pipeline: MRISPipeline, split, index: int, path: Path) -> None:
    example = split[index]
    updates = list(pipeline.stream(example.image, example.description, order="scale"))
    fig, axes = plt.subplots(1, len(updates) + 1, figsize=(1.7 * (len(updates) + 1), 2.2))
    for ax, update in zip(axes, updates, strict=False):
        ax.imshow(example.image, cmap="gray")
        ax.imshow(np.ma.masked_where(~update.mask, update.mask), cmap="autumn", alpha=0.6)
        ax.set_title(f"{update.tokens_done} tokens", fontsize=8)
        ax.axis("off")
    axes[-1].imshow(example.mask, cmap="gray")
    axes[-1].set_title("ground truth", fontsize=8)
    axes[-1].axis("off")
    fig.suptitle(textwrap.shorten(example.description, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", type=Path, required=True, help="LViT split folder (Val_Folder)")
    parser.add_argument("--eval-json", type=Path, help="eval output, to pick cases across the Dice range")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--order", default="scale", choices=("scale", "raster"))
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    pipeline = MRISPipeline.from_pretrained(args.model, device="cpu")
    split = load_split(args.data)
    indices = pick_cases(split, args.eval_json, args.cases)
    args.out.mkdir(parents=True, exist_ok=True)
    render_cases(pipeline, split, indices, args.order, args.out / "val_cases.png")
    render_coarse_to_fine(pipeline, split, indices[len(indices) // 2], args.out / "coarse_to_fine.png")
    print(f"wrote {args.out / 'val_cases.png'} and {args.out / 'coarse_to_fine.png'} (cases {indices})")


if __name__ == "__main__":
    main()
