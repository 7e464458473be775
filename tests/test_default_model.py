"""The bundled default model: present, loadable without setup, and drawing on the bundled sample image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from napari_mris.io import read_slice
from napari_mris.model_location import DEFAULT_MODEL_DIR
from napari_mris.pipeline import MRISPipeline

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"


def test_bundled_model_is_small_and_has_a_model_card() -> None:
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "mask_tokenizer.safetensors", "MODEL_CARD.md"} <= set(files)
    assert sum(files.values()) <= 40 * 1024 * 1024
    assert not any(name.endswith((".pt", ".pth", ".bin", ".ckpt")) for name in files)  # safetensors only
    assert json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["model_id"] == "default-qata-v9"


def test_default_model_segments_the_sample_phantom() -> None:
    pipeline = MRISPipeline.from_pretrained("default", device="cpu")
    image = read_slice(SAMPLES / "img" / "phantom_07.png", expect_2d=True)
    description = "Bilateral pulmonary infection, three infected areas, lower left lung and upper lower right lung."
    updates = list(pipeline.stream(image.pixels, description, window=image.window, order="scale"))
    assert len(updates) == len(pipeline.tokenizers.masks["scale"].scales)  # one coarse-to-fine update per scale
    result = updates[-1]
    assert result.finished and not result.rejected
    assert result.mask.shape == image.pixels.shape and result.mask.any()


def test_default_model_snaps_its_finished_mask_to_its_lesion_map() -> None:
    """v4's stem draws a lesion map; the finished mask is the token mask snapped to it (lesion_snap.py),
    and `snap=False` gives the token mask as decoded. The settings record which one a mask is."""
    from napari_mris.lesion_snap import snap_to_lesion_map
    from napari_mris.pipeline import lesion_probability

    pipeline = MRISPipeline.from_pretrained("default", device="cpu")
    image = read_slice(SAMPLES / "img" / "phantom_07.png", expect_2d=True)
    description = "Bilateral pulmonary infection, three infected areas, lower left lung and upper lower right lung."
    tokens = pipeline.segment(image.pixels, description, window=image.window, snap=False)
    snapped = pipeline.segment(image.pixels, description, window=image.window)
    assert snapped.settings.snap and not tokens.settings.snap
    model_image, _ = pipeline._model_input(image.pixels, image.window)
    with torch.inference_mode():
        lesion = lesion_probability(pipeline.decoder.lesion_logits(model_image[None]), image.pixels.shape)
    assert lesion is not None and lesion.shape == image.pixels.shape
    np.testing.assert_allclose(pipeline.lesion_map(image.pixels, image.window), lesion, atol=1e-6)
    expected = snap_to_lesion_map(tokens.probability, lesion)
    np.testing.assert_allclose(snapped.probability, expected, atol=1e-6)
    assert np.array_equal(snapped.mask, expected >= 0.5) and snapped.mask.sum() >= tokens.mask.sum()

    pipeline.lesion_threshold = 0.8  # an adapter's calibrated cut (adapters.adapter_lesion_threshold)
    tighter = pipeline.segment(image.pixels, description, window=image.window)
    assert np.array_equal(tighter.mask, snap_to_lesion_map(tokens.probability, lesion, 0.8) >= 0.5)
    assert tighter.mask.sum() < snapped.mask.sum() and pipeline.info()["lesion_threshold"] == 0.8
