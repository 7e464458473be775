"""`napari-mris-train export`: a training run's last weights as a clean model directory to ship.

The trainer keeps `model.safetensors` for the best in-run validation (the referring selection score) and
`checkpoints/last/` for the last step; `--weights` picks one. This writes only what the runtime needs
(config, decoder, tokenizers, and the domain-guard and prompt-vocabulary files when the run has them), never
the cache, checkpoints or logs, and ends with the `SHA256SUMS` manifest the runtime verifies the files
against on every load. `--float16` stores the decoder's weights in half precision (they load into float32):
half the size in the repository's history, for a model where that was measured to cost no accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from napari_mris.errors import MRISError
from napari_mris.model.decoder_files import load_decoder, save_decoder
from napari_mris.model.modeldir import MANIFEST_NAME, update_config, write_manifest
from napari_mris_train.checkpoint import load_checkpoint, part

RUNTIME_FILES = ("config.json", "image_tokenizer.safetensors", "mask_tokenizer.safetensors", "tokenizer.json")
OPTIONAL_FILES = ("domain.safetensors", "prompt_vocabulary.json")  # copied when the run has them
LOG_NAME = "train_log.jsonl"


def export_run(
    run_dir: Path,
    out: Path,
    model_id: str,
    default_order: str | None = None,
    *,
    weights: str = "last",
    float16: bool = False,
) -> int:
    """Copy the runtime files of `run_dir` to `out` with the chosen decoder weights; returns their step.

    `weights`: "last" (the last checkpoint) or "best" (`model.safetensors`, the best validation score).
    `default_order` (the order that validated best) becomes the order the pipeline and widget use unasked.
    """
    if weights not in ("last", "best"):
        raise MRISError(f"--weights must be 'last' or 'best', got {weights!r}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # an earlier export's manifest would refuse the files copied below
    for name in RUNTIME_FILES + tuple(n for n in OPTIONAL_FILES if (run_dir / n).is_file()):
        shutil.copy2(run_dir / name, out / name)
    decoder, layout = load_decoder(run_dir)  # model.safetensors: the best weights
    if default_order is not None and default_order not in layout.orders:
        raise MRISError(f"default order {default_order!r} is not one of the model's orders {layout.orders}")
    if weights == "last":
        tensors, info = load_checkpoint(run_dir / "checkpoints" / "last")
        decoder.load_state_dict(part(tensors, "model"))
        step = int(info["step"])
    else:
        step = best_step(run_dir)
    save_decoder(decoder.to(torch.float16) if float16 else decoder, layout, out)
    update_config(out, model_id=model_id, trained_steps=step, weights_dtype="float16" if float16 else "float32")
    if default_order is not None:
        update_config(out, default_order=default_order)
    write_manifest(out)
    return step


def best_step(run_dir: Path) -> int:
    """The step whose validation wrote `model.safetensors` last (the run's log says it)."""
    log = run_dir / LOG_NAME
    saved = [
        record["step"]
        for record in map(json.loads, log.read_text(encoding="utf-8").splitlines() if log.is_file() else [])
        if record.get("saved_best")
    ]
    if not saved:
        raise MRISError(f"{log} records no saved best weights: export --weights last instead")
    return int(saved[-1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="a trained model directory (with checkpoints/last)")
    parser.add_argument("--out", required=True, type=Path, help="the model directory to write")
    parser.add_argument("--model-id", required=True, help="the model's name, e.g. default-qata-v1")
    parser.add_argument(
        "--default-order", choices=("scale", "raster"), help="the order used when none is asked for (default: scale)"
    )
    parser.add_argument(
        "--weights",
        choices=("last", "best"),
        default="last",
        help="the last checkpoint, or model.safetensors: the best validation (referring selection) score",
    )
    parser.add_argument("--float16", action="store_true", help="store the decoder weights in half precision")


def run(args: argparse.Namespace) -> int:
    try:
        step = export_run(
            args.run, args.out, args.model_id, args.default_order, weights=args.weights, float16=args.float16
        )
    except (MRISError, OSError) as exc:
        print(f"error: {exc}")
        return 1
    print(f"exported the step-{step} decoder ({args.weights}) of {args.run} to {args.out}")
    return 0
