"""The bundled default model: present, loadable without setup, and drawing on the bundled sample image."""

from __future__ import annotations

import json
from pathlib import Path

from napari_mris.io import read_slice
from napari_mris.pipeline import DEFAULT_MODEL_DIR, MRISPipeline

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"


def test_bundled_model_is_small_and_has_a_model_card() -> None:
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "mask_tokenizer.safetensors", "MODEL_CARD.md"} <= set(files)
    assert sum(files.values()) <= 40 * 1024 * 1024
    assert not any(name.endswith((".pt", ".pth", ".bin", ".ckpt")) for name in files)  # safetensors only
    assert json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["model_id"] == "default-qata-v3"


def test_default_model_segments_the_sample_phantom() -> None:
    pipeline = MRISPipeline.from_pretrained("default", device="cpu")
    image = read_slice(SAMPLES / "img" / "phantom_07.png", expect_2d=True)
    description = "Bilateral pulmonary infection, three infected areas, lower left lung and upper lower right lung."
    updates = list(pipeline.stream(image.pixels, description, window=image.window, order="scale"))
    assert len(updates) == len(pipeline.tokenizers.masks["scale"].scales)  # one coarse-to-fine update per scale
    result = updates[-1]
    assert result.finished and not result.rejected
    assert result.mask.shape == image.pixels.shape and result.mask.any()
