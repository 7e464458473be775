"""A small model directory for the pipeline, widget, CLI and screenshot tests, built once per session.

The tests here check plumbing (shapes, streaming, threading, layers, files), not accuracy, so whichever
tiny model is at hand will do: the training package's `build_tiny_model` when it is installed, else an
untrained model assembled from the runtime's own classes (a second, not a minute). Because an untrained or
barely trained model may answer [SOV] or [REJ] at random, `force_decision` pins the presence decision with a
forward hook on the output layer: a test that needs a mask forces [SOV], the [REJ] test forces [REJ].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

PROMPTS = [
    "Bilateral pulmonary infection, two infected areas, lower left lung and upper right lung.",
    "Unilateral pulmonary infection, one infected area, middle left lung.",
    "Lower right lung infection",
    "all left lung",
]


def build_model(out_dir: Path) -> Path:
    """The training package's tiny model if available, else an untrained model of the same kind."""
    try:
        from napari_mris_train.tiny import build_tiny_model
    except ImportError:
        return build_untrained_model(out_dir)
    return Path(build_tiny_model(out_dir))


def build_untrained_model(out_dir: Path, image_size: int = 32) -> Path:
    """Randomly initialised tokenizers and decoder, saved through the runtime's own writers."""
    from napari_mris.model.decoder import DecoderConfig, MRISDecoder, save_decoder
    from napari_mris.model.modeldir import update_config
    from napari_mris.model.vocab import VocabLayout
    from napari_mris.tokenizers import save_tokenizers
    from napari_mris.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from napari_mris.tokenizers.mask import MaskTokenizer, MaskTokenizerConfig
    from napari_mris.tokenizers.text import TextTokenizer

    torch.manual_seed(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = ImageTokenizer(ImageTokenizerConfig(image_size=image_size, grid=4, fsq_levels=(4, 4), channels=(8, 16, 16)))
    masks = {
        "raster": MaskTokenizer(MaskTokenizerConfig(image_size, (4,), 8, 32, (8, 16, 16))),
        "scale": MaskTokenizer(MaskTokenizerConfig(image_size, (1, 2, 4), 8, 32, (8, 16, 16))),
    }
    text = TextTokenizer.train(PROMPTS * 4, vocab_size=120, max_length=12)
    save_tokenizers(out_dir, image, masks, text)
    layout = VocabLayout(n_text=text.vocab_size, n_image=image.codebook_size, n_mask={k: 32 for k in masks})
    config = DecoderConfig(
        vocab_size=layout.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        nktp_k=4,
        n_scales=3,
    )
    save_decoder(MRISDecoder(config).eval(), layout, out_dir)
    update_config(out_dir, model_id="untrained-tiny", orders=["raster", "scale"])
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir: Path):
    from napari_mris.pipeline import MRISPipeline

    return MRISPipeline.from_pretrained(tiny_model_dir, device="cpu")


@contextlib.contextmanager
def force_decision(pipeline, token: str) -> Iterator[None]:
    """Make the model choose [SOV] (target present) or [REJ] (absent) at the decision position."""
    from napari_mris.model.vocab import REJ, SOV

    favoured = {"SOV": SOV, "REJ": REJ}[token]

    def hook(module, inputs, output):
        output = output.clone()
        output[..., favoured] += 1e4  # only [SOV]/[REJ] are legal there; elsewhere they are masked out anyway
        return output

    handle = pipeline.decoder.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
