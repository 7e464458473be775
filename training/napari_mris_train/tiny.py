"""A complete but useless model directory in seconds, for tests of the pipeline, the widget and the CLIs.

Phantom chest X-rays at 32 px (`napari_mris.phantom`), tiny tokenizers and a tiny decoder trained for a
few steps with `training/configs/tiny.yaml`. Every file a real model directory has is there, produced by
the real training code, so tests exercise the same paths as a real model.

    python -m napari_mris_train.tiny OUT_DIR [--data DATA_ROOT] [--seed N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from napari_mris.io.atomic import write_text_atomic
from napari_mris.model.modeldir import update_config
from napari_mris.phantom import write_lvit_dataset
from napari_mris_train.config import load_recipe
from napari_mris_train.data import load_split
from napari_mris_train.tokenizer_training import recipe_from_sections, train_tokenizers
from napari_mris_train.trainer import train

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
N_TRAIN, N_VAL, SIZE = 24, 8, 32

MODEL_CARD = """# tiny-phantom (test model)

Trained in seconds on {n_train} synthetic 32 px phantoms with `training/configs/tiny.yaml` (seed {seed}).
It exists so that tests can load a complete model directory; its masks are meaningless. Do not use it on
images of patients.
"""


def build_tiny_model(
    out_dir: str | Path,
    data_root: str | Path | None = None,
    seed: int = 0,
    *,
    tokenizer_steps: int | None = None,
    decoder_steps: int | None = None,
) -> Path:
    """Write phantoms (unless `data_root` already holds an LViT dataset), train everything, return `out_dir`.

    `tokenizer_steps` / `decoder_steps` override the recipe (0 tokenizer steps = untrained tokenizers, a
    valid but even faster directory for tests that only need the files and the code paths).
    """
    out_dir = Path(out_dir)
    recipe = load_recipe(TINY_CONFIG)
    steps = recipe.train.steps if decoder_steps is None else decoder_steps
    recipe = replace(recipe, train=replace(recipe.train, seed=seed, steps=steps))
    with tempfile.TemporaryDirectory(prefix="mris-tiny-data-") as scratch:
        root = Path(data_root) if data_root is not None else Path(scratch)
        if not (root / "Train_Folder").is_dir():
            write_lvit_dataset(root, N_TRAIN, N_VAL, size=SIZE, seed=seed)
        tokenizer_recipe = replace(recipe_from_sections(recipe.sections, str(TINY_CONFIG)), seed=seed)
        train_split = load_split(root, split="train")
        train_tokenizers(tokenizer_recipe, train_split, out_dir, steps=tokenizer_steps, progress=False)
        train(recipe, root, out_dir, progress=False)
    update_config(out_dir, model_id="tiny-phantom")
    write_text_atomic(out_dir / "MODEL_CARD.md", MODEL_CARD.format(n_train=N_TRAIN, seed=seed))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data", type=Path, help="LViT root to use (phantoms are written there if it is empty)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out_dir, args.data, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
