"""`napari-mris-train export`: a training run's last weights as a clean model directory to ship.

The trainer keeps `model.safetensors` for the best in-run validation and `checkpoints/last/` for the last
step; the shipped default model is the last step (the end of the cosine schedule). This writes only what
the runtime needs (config, decoder, tokenizers), never the cache, checkpoints or logs, and ends with the
`SHA256SUMS` manifest the runtime verifies the files against on every load.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from napari_mris.errors import MRISError
from napari_mris.model.decoder import load_decoder, save_decoder
from napari_mris.model.modeldir import MANIFEST_NAME, update_config, write_manifest
from napari_mris_train.checkpoint import load_checkpoint, part

RUNTIME_FILES = ("config.json", "image_tokenizer.safetensors", "mask_tokenizer.safetensors", "tokenizer.json")


def export_last(run_dir: Path, out: Path, model_id: str, default_order: str | None = None) -> int:
    """Copy the runtime files of `run_dir` to `out` with the last checkpoint's decoder; returns its step.

    `default_order` (the order that validated best) becomes the order the pipeline and widget use unasked.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # an earlier export's manifest would refuse the files copied below
    for name in RUNTIME_FILES:
        shutil.copy2(run_dir / name, out / name)
    decoder, layout = load_decoder(run_dir)
    if default_order is not None and default_order not in layout.orders:
        raise MRISError(f"default order {default_order!r} is not one of the model's orders {layout.orders}")
    tensors, info = load_checkpoint(run_dir / "checkpoints" / "last")
    decoder.load_state_dict(part(tensors, "model"))
    save_decoder(decoder, layout, out)
    update_config(out, model_id=model_id, trained_steps=int(info["step"]))
    if default_order is not None:
        update_config(out, default_order=default_order)
    write_manifest(out)
    return int(info["step"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="a trained model directory (with checkpoints/last)")
    parser.add_argument("--out", required=True, type=Path, help="the model directory to write")
    parser.add_argument("--model-id", required=True, help="the model's name, e.g. default-qata-v1")
    parser.add_argument(
        "--default-order", choices=("scale", "raster"), help="the order used when none is asked for (default: scale)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        step = export_last(args.run, args.out, args.model_id, args.default_order)
    except (MRISError, OSError) as exc:
        print(f"error: {exc}")
        return 1
    print(f"exported the step-{step} decoder of {args.run} to {args.out}")
    return 0
