"""MaskTokenizer: shapes, determinism, the coarse preview, resizing, and the EMA codebook."""

from __future__ import annotations

import pytest
import torch

from napari_mris.tokenizers.mask import MaskTokenizer, MaskTokenizerConfig

TINY = dict(image_size=32, latent_dim=8, codebook_size=32, channels=(16, 32, 32))


def _masks(batch: int = 3, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = [((yy - 8 - 4 * i) ** 2 + (xx - 12 - 2 * i) ** 2 < (5 + i) ** 2) for i in range(batch)]
    return torch.stack(masks)[:, None].float()


@pytest.fixture(scope="module")
def multi() -> MaskTokenizer:
    torch.manual_seed(0)
    return MaskTokenizer(MaskTokenizerConfig(scales=(1, 2, 4), **TINY)).eval()


def test_encode_gives_one_code_grid_per_scale(multi):
    codes = multi.encode(_masks())
    assert [tuple(c.shape) for c in codes] == [(3, 1), (3, 4), (3, 16)]
    assert all(c.dtype == torch.long and int(c.min()) >= 0 and int(c.max()) < 32 for c in codes)


def test_encode_and_decode_are_deterministic(multi):
    masks = _masks()
    first, second = multi.encode(masks), multi.encode(masks)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.equal(multi.decode(first), multi.decode(second))


def test_decode_full_and_partial_scales(multi):
    codes = multi.encode(_masks())
    full = multi.decode(codes)
    assert full.shape == (3, 1, 32, 32)
    assert float(full.min()) >= 0 and float(full.max()) <= 1
    coarse = multi.decode(codes[:1])
    assert coarse.shape == (3, 1, 32, 32)
    assert not torch.equal(coarse, full)  # the preview is the partial residual sum, not the full mask


def test_other_resolutions_in_and_out(multi):
    big = torch.nn.functional.interpolate(_masks(), size=(64, 64), mode="nearest")
    codes = multi.encode(big)
    assert codes[-1].shape == (3, 16)
    assert multi.decode(codes, out_size=(50, 70)).shape == (3, 1, 50, 70)


def test_bad_codes_are_rejected(multi):
    with pytest.raises(ValueError, match="scale 2"):
        multi.decode([torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="0..31"):
        multi.decode([torch.full((1, 1), 32)])
    with pytest.raises(ValueError, match="1..3 scales"):
        multi.decode([])
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        multi.encode(torch.zeros(2, 32, 32))


def test_single_scale_is_the_same_class():
    tok = MaskTokenizer(MaskTokenizerConfig(scales=(4,), **TINY)).eval()
    codes = tok.encode(_masks(2))
    assert len(codes) == 1 and codes[0].shape == (2, 16)
    assert tok.decode(codes).shape == (2, 1, 32, 32)


def test_config_rejects_unordered_scales_and_bad_grids():
    with pytest.raises(ValueError, match="strictly increasing"):
        MaskTokenizerConfig(scales=(4, 2))
    with pytest.raises(ValueError, match="power of two"):
        MaskTokenizer(MaskTokenizerConfig(image_size=48, scales=(4,), channels=(16, 32)))


def test_training_step_restarts_dead_codes_on_the_data():
    torch.manual_seed(0)
    tok = MaskTokenizer(MaskTokenizerConfig(scales=(1, 2, 4), **TINY)).train()
    before = tok.quantizer.codebook.clone()
    out = tok(_masks(4))
    out.vq_loss.backward()
    q = tok.quantizer
    assert not torch.equal(before, q.codebook)
    assert bool((q.ema_count > 0).all())  # every code was (re)started on an encoder vector
    assert tok.encoder.net[-1].weight.grad is not None and q.phi.weight.grad is not None


def test_encode_never_moves_the_codebook_even_in_train_mode():
    tok = MaskTokenizer(MaskTokenizerConfig(scales=(1, 2, 4), **TINY)).train()
    before = tok.quantizer.codebook.clone()
    tok.encode(_masks())
    assert torch.equal(before, tok.quantizer.codebook)
