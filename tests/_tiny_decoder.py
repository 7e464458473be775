"""The smallest decoder the unit tests build: one vocabulary and one config for the decoder, decoding and
pixel-stem tests, so a change to `DecoderConfig` is made in one place."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from napari_mris.model.decoder import DecoderConfig
from napari_mris.model.vocab import VocabLayout

TINY_LAYOUT = VocabLayout(n_text=12, n_image=8, n_mask={"raster": 6, "scale": 6})


def tiny_decoder_config(**overrides) -> DecoderConfig:
    """A 2-layer, 32-wide Llama over `TINY_LAYOUT`; `overrides` replace any field."""
    settings = dict(
        vocab_size=TINY_LAYOUT.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        dropout=0.0,
        nktp_k=4,
        n_scales=3,
    )
    settings.update(overrides)
    return DecoderConfig(**settings)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models decode fastest on one thread; two threads fight the other processes on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
