"""`napari-mris-train phantoms`: synthetic chest X-ray phantoms written as an LViT dataset.

The default model trains on QaTa-COV19 plus a few hundred of these (`train --extra-train`), so the
bundled sample images, which are phantoms, are in its training distribution too.
"""

from __future__ import annotations

import argparse

from napari_mris.phantom import write_lvit_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="LViT root to write (Train_Folder, Val_Folder)")
    parser.add_argument("--train", type=int, default=600, help="number of training phantoms")
    parser.add_argument("--val", type=int, default=100, help="number of validation phantoms")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=1, help="seed; >= 1 never repeats the sample phantoms")


def run(args: argparse.Namespace) -> int:
    if args.train < 1 or args.val < 0 or args.size < 32:
        print("error: need --train >= 1, --val >= 0 and --size >= 32")
        return 2
    root = write_lvit_dataset(args.out, args.train, args.val, size=args.size, seed=args.seed)
    print(f"wrote {args.train} train and {args.val} val phantoms to {root}")
    return 0
