"""Does correcting N cases and adapting help on the cases after them? The correction loop, simulated.

The first N images of QaTa-COV19 Val_Folder play the radiologist's corrected cases: each goes into a
corrections store with its ground-truth mask as the "correction" and its description as the prompt,
exactly as "Save as training example" would write it. A LoRA adapter is then fine-tuned on the store
(with replay of the first 256 Train_Folder pairs, as the widget does when given replay data), and Dice is measured on a
fixed set of later validation images (never among the corrected ones) before and after, for each N.

    python benchmarks/adaptation_loop.py --model src/napari_mris/models/default \\
        --data ../shared/data/QaTa-COV19 --n 10 50 200 --json runs/adaptation_loop.json

Adapters go to a temporary per-user adapters folder (`NAPARI_MRIS_ADAPTERS`, napari_mris.adapters), so the
benchmark leaves neither the model directory nor the user's own adapters touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from napari_mris.corrections import CorrectionsStore
from napari_mris.phantom import write_text_table
from napari_mris.pipeline import MRISPipeline, resolve_model_dir
from napari_mris_train.data import load_split
from napari_mris_train.evaluate import evaluate_split
from napari_mris_train.finetune import finetune


class Subset:
    """Pairs [start, stop) of a split, with the split's interface (what evaluate_split needs)."""

    def __init__(self, split, start: int, stop: int) -> None:
        self.split, self.start, self.stop = split, start, min(stop, len(split))
        self.folder = split.folder
        self.descriptions = split.descriptions[self.start : self.stop]

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        return self.split[self.start + index]


def write_corrections(split, count: int, root: Path) -> CorrectionsStore:
    """The first `count` validation cases, saved as a radiologist's corrections (ground truth as the fix)."""
    store = CorrectionsStore(root)
    for index in range(count):
        example = split[index]
        store.add(example.image, example.description, example.mask, model_id="benchmark")
    return store


def write_replay(split, count: int, root: Path) -> Path:
    """The first `count` training pairs as a small LViT split (encoding all 5,716 would dominate the run)."""
    folder = root / "Train_Folder"
    (folder / "img").mkdir(parents=True)
    (folder / "labelcol").mkdir()
    rows = []
    for _name, image_path, mask_path, description in split.pairs[:count]:
        shutil.copy2(image_path, folder / "img" / image_path.name)
        shutil.copy2(mask_path, folder / "labelcol" / mask_path.name)
        rows.append((mask_path.name, description))
    write_text_table(folder / "Train_text.csv", rows)
    return root


def dice_on(model_dir: Path, adapter: str | None, cases, order: str) -> tuple[float, float]:
    pipeline = MRISPipeline.from_pretrained(model_dir, device="cpu", adapter=adapter)
    report = evaluate_split(pipeline, cases, order=order, sets=("full",), progress=False)
    return report["dice"], report["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model directory (never modified)")
    parser.add_argument("--data", type=Path, required=True, help="LViT root with Train_Folder and Val_Folder")
    parser.add_argument("--n", type=int, nargs="+", default=[10, 50, 200], help="numbers of corrected cases")
    parser.add_argument("--eval-count", type=int, default=300, help="later validation cases scored (after max N)")
    parser.add_argument("--steps", type=int, default=100, help="LoRA steps per adaptation (the widget uses 200)")
    parser.add_argument("--replay-count", type=int, default=256, help="training pairs replayed while adapting")
    parser.add_argument("--order", default="scale", choices=("scale", "raster"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the table here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    val = load_split(args.data, split="val")
    first_eval = max(args.n)
    cases = Subset(val, first_eval, first_eval + args.eval_count)
    with tempfile.TemporaryDirectory(prefix="mris-adapt-bench-") as scratch:
        os.environ["NAPARI_MRIS_ADAPTERS"] = str(Path(scratch) / "adapters")
        model_dir = resolve_model_dir(args.model)
        replay = write_replay(load_split(args.data, split="train"), args.replay_count, Path(scratch) / "replay")
        before, eval_seconds = dice_on(model_dir, None, cases, args.order)
        print(f"base model: Dice {100 * before:.2f} % on val[{first_eval}:{cases.stop}] ({eval_seconds:.0f} s)")
        rows = []
        for n in args.n:
            store = write_corrections(val, n, Path(scratch) / f"corrections_{n}")
            start = time.perf_counter()
            finetune(model_dir, store.root, f"n{n}", args.steps, replay_data=replay, seed=0)
            adapt_seconds = time.perf_counter() - start
            after, _ = dice_on(model_dir, f"n{n}", cases, args.order)
            rows.append({"n": n, "dice_before": before, "dice_after": after, "adapt_seconds": adapt_seconds})
            print(f"N={n:4d}: Dice {100 * before:.2f} -> {100 * after:.2f} %, adaptation {adapt_seconds:.0f} s")
    print("\n| corrected cases N | Dice before | Dice after | change | adaptation time |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        change = 100 * (r["dice_after"] - r["dice_before"])
        print(
            f"| {r['n']} | {100 * r['dice_before']:.2f} % | {100 * r['dice_after']:.2f} % | {change:+.2f} | "
            f"{r['adapt_seconds']:.0f} s |"
        )
    if args.json:
        summary = {"eval_cases": [first_eval, cases.stop], "steps": args.steps, "order": args.order, "rows": rows}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
