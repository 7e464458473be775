"""to_model_image and resize_probability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mris.errors import UnsupportedImageError
from napari_mris.tokenizers.preprocess import resize_probability, to_model_image


def test_window_is_applied_and_clipped():
    pixels = np.array([[-1000.0, 0.0], [40.0, 1000.0]], np.float32)
    out = to_model_image(pixels, (-160.0, 240.0), 2)
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_allclose(out, [[0.0, 0.4], [0.5, 1.0]], atol=1e-6)


def test_percentiles_without_window_ignore_outliers():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(100, 200, (64, 64)).astype(np.float32)
    pixels[0, 0] = 1e6  # one burnt-in pixel must not squash the contrast
    out = to_model_image(pixels, None, 64)
    assert 0.4 < float(np.median(out)) < 0.6
    assert out.min() == 0.0 and out.max() == 1.0


def test_resizes_down_and_up_and_accepts_integers():
    assert to_model_image(np.arange(300 * 200, dtype=np.uint16).reshape(300, 200), None, 32).shape == (32, 32)
    assert to_model_image(np.eye(8, dtype=np.int32), None, 32).shape == (32, 32)


def test_constant_and_nonfinite_images():
    assert not to_model_image(np.full((8, 8), 7.0), None, 8).any()
    pixels = np.ones((8, 8), np.float32)
    pixels[0] = np.nan
    pixels[1] = 2
    out = to_model_image(pixels, None, 8)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("shape", [(8, 8, 3), (8, 8, 4)])
def test_colour_is_rejected_with_advice(shape):
    with pytest.raises(UnsupportedImageError, match="convert it to gray"):
        to_model_image(np.zeros(shape), None, 8)


def test_volumes_and_empty_arrays_are_rejected():
    with pytest.raises(UnsupportedImageError, match="2D slice"):
        to_model_image(np.zeros((3, 8, 8)), None, 8)
    with pytest.raises(UnsupportedImageError, match="too small"):
        to_model_image(np.zeros((0, 8)), None, 8)


def test_resize_probability_numpy_and_torch():
    prob = np.zeros((4, 4), np.float32)
    prob[:, 2:] = 1
    out = resize_probability(prob, (8, 12))
    assert isinstance(out, np.ndarray) and out.shape == (8, 12)
    assert out[:, :4].max() == 0 and out[:, -4:].min() == 1
    tensor = resize_probability(torch.from_numpy(prob)[None, None], (8, 12))
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (1, 1, 8, 12)
    np.testing.assert_allclose(tensor[0, 0].numpy(), out)
