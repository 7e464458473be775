"""ImageTokenizer (FSQ autoencoder): shapes, code range, determinism, input checks."""

from __future__ import annotations

import pytest
import torch

from napari_mris.tokenizers.image import ImageTokenizer, ImageTokenizerConfig


@pytest.fixture(scope="module")
def tok() -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(ImageTokenizerConfig(image_size=32, grid=4, fsq_levels=(4, 4), channels=(16, 32, 32))).eval()


def test_encode_decode_shapes_and_range(tok):
    images = torch.rand(2, 1, 32, 32)
    codes = tok.encode(images)
    assert codes.shape == (2, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < tok.codebook_size == 16
    out = tok.decode(codes)
    assert out.shape == (2, 1, 32, 32)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_deterministic_and_decode_matches_forward(tok):
    images = torch.rand(2, 1, 32, 32)
    assert torch.equal(tok.encode(images), tok.encode(images))
    with torch.no_grad():
        forward = tok(images).reconstruction.clamp(0, 1)
    torch.testing.assert_close(tok.decode(tok.encode(images)), forward)


def test_wrong_inputs_raise(tok):
    with pytest.raises(ValueError, match="32x32"):
        tok.encode(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        tok.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="0..15"):
        tok.decode(torch.full((1, 16), 16))
