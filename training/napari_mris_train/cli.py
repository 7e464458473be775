"""`napari-mris-train`: one subcommand per module, so each stays readable on its own.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only
when its subcommand runs, so `napari-mris-train --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

SUBCOMMANDS = {
    "tokenizers": ("napari_mris_train.tokenizer_training", "train (or --eval) the image, mask and text tokenizers"),
    "train": ("napari_mris_train.trainer", "train the decoder with the NTP-MRISeg losses"),
    "finetune": ("napari_mris_train.finetune", "LoRA fine-tuning on a dataset or a corrections folder"),
    "eval": ("napari_mris_train.evaluate", "Dice / mIoU / text-shuffle / N-Acc on a validation split"),
    "presence": ("napari_mris_train.presence", "calibrate the 'not present' threshold (config.json reject_threshold)"),
    "export": ("napari_mris_train.export_model", "write a run's last weights as a clean model directory"),
    "phantoms": ("napari_mris_train.phantoms", "write synthetic chest X-ray phantoms as an LViT dataset"),
    "domain": ("napari_mris_train.domain", "calibrate the domain guard (domain.safetensors) on a dataset"),
    "vocabulary": ("napari_mris_train.vocabulary", "record the training descriptions' words (prompt_vocabulary.json)"),
}


def add_training_data(parser: argparse.ArgumentParser, extra_help: str) -> None:
    """`--data ROOT` and the repeatable `--extra-train ROOT`, one definition for `train` and `domain`.

    Why shared: the domain guard's statistics must come from the very images the decoder trained on, so
    both commands must read the two options alike.
    """
    parser.add_argument("--data", required=True, type=Path, help="LViT root with Train_Folder and Val_Folder")
    parser.add_argument("--extra-train", type=Path, action="append", default=[], metavar="ROOT", help=extra_help)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-mris-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = argv[0] if argv else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == chosen:  # import only the module that will run
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
