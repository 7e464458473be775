"""The patch-codebook mask tokenizer: fixed codes for empty and full patches, k-means for the borders."""

from __future__ import annotations

import pytest
import torch

from napari_mris.tokenizers import load_tokenizers, save_tokenizers
from napari_mris.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from napari_mris.tokenizers.patch import (
    EMPTY,
    FULL,
    PatchMaskTokenizer,
    PatchMaskTokenizerConfig,
    _squared_distance,
    fit_codebook,
)
from napari_mris.tokenizers.text import TextTokenizer


def disks(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random disks: lesion-like masks with curved borders."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        cy, cx = torch.randint(4, size - 4, (2,), generator=g).tolist()
        r = float(torch.randint(2, 9, (1,), generator=g))
        masks[i, 0] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float()
    return masks


@pytest.fixture(scope="module")
def fitted() -> tuple[PatchMaskTokenizer, PatchMaskTokenizer]:
    raster = fit_codebook(PatchMaskTokenizer(PatchMaskTokenizerConfig(32, (8,), 24)), disks(200))
    pyramid = fit_codebook(PatchMaskTokenizer(PatchMaskTokenizerConfig(32, (1, 2, 4, 8), 24)), disks(200))
    return raster, pyramid


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    inter, total = (a * b).sum(), a.sum() + b.sum()
    return float(2 * inter / total) if total else 1.0


def test_empty_and_full_patches_have_fixed_codes(fitted) -> None:
    raster, _ = fitted
    empty, full = torch.zeros(1, 1, 32, 32), torch.ones(1, 1, 32, 32)
    assert raster.encode(empty)[0].unique().tolist() == [EMPTY]
    assert raster.encode(full)[0].unique().tolist() == [FULL]
    assert raster.decode(raster.encode(empty)).max() == 0 and raster.decode(raster.encode(full)).min() == 1


def test_nearest_is_the_exhaustive_search(fitted) -> None:
    """Encoding skips the search for empty and full patches; the codes must equal a search of every code."""
    _, pyramid = fitted
    masks = torch.cat([disks(40, seed=3), torch.zeros(2, 1, 32, 32), torch.ones(2, 1, 32, 32)])
    for scale in pyramid.scales:
        patches = pyramid.patches(masks, scale)
        flat = patches.reshape(-1, patches.shape[-1])
        exhaustive = torch.cdist(flat, pyramid.codebook).argmin(1).view(patches.shape[:-1])
        assert torch.equal(pyramid.nearest(patches), exhaustive)


def test_round_trip_shapes_determinism_and_quality(fitted) -> None:
    raster, pyramid = fitted
    masks = disks(20, seed=1)  # not the fitting masks
    codes = raster.encode(masks)
    assert [c.shape for c in codes] == [(20, 64)] and codes[0].dtype == torch.long
    assert torch.equal(codes[0], raster.encode(masks)[0])
    recon = (raster.decode(codes) >= 0.5).float()
    assert recon.shape == masks.shape
    assert dice(recon, masks) > 0.85
    assert raster.decode(codes, out_size=(64, 48)).shape == (20, 1, 64, 48)
    scales = pyramid.encode(masks)
    assert [c.shape[1] for c in scales] == [1, 4, 16, 64]
    coarse_to_fine = [dice((pyramid.decode(scales[: k + 1]) >= 0.5).float(), masks) for k in range(4)]
    assert coarse_to_fine[-1] > 0.85 and coarse_to_fine[-1] >= coarse_to_fine[1]  # every prefix decodes


def test_bad_codes_and_configs_are_rejected(fitted) -> None:
    raster, _ = fitted
    with pytest.raises(ValueError, match="0..23"):
        raster.decode([torch.full((1, 64), 24)])
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        raster.decode([torch.zeros(1, 10, dtype=torch.long)])
    with pytest.raises(ValueError, match="multiple of the grid"):
        PatchMaskTokenizerConfig(30, (8,), 24)
    with pytest.raises(ValueError, match="boundary patches"):
        fit_codebook(PatchMaskTokenizer(PatchMaskTokenizerConfig(32, (8,), 500)), disks(2))


def test_saved_and_loaded_through_the_model_directory(fitted, tmp_path) -> None:
    raster, pyramid = fitted
    image = ImageTokenizer(ImageTokenizerConfig(image_size=32, grid=4, fsq_levels=(4, 4), channels=(16, 32, 32)))
    text = TextTokenizer.train(["lower left lung", "upper right lung"], vocab_size=300, max_length=8)
    save_tokenizers(tmp_path, image.eval(), {"raster": raster, "scale": pyramid}, text)
    loaded = load_tokenizers(tmp_path)
    assert isinstance(loaded.masks["raster"], PatchMaskTokenizer)
    masks = disks(5, seed=2)
    for order, original in (("raster", raster), ("scale", pyramid)):
        for a, b in zip(original.encode(masks), loaded.masks[order].encode(masks), strict=True):
            assert torch.equal(a, b)


def test_border_refiner_starts_neutral_keeps_the_codes_and_sharpens_the_masks(tmp_path) -> None:
    from napari_mris_train.tokenizer_training import refiner_loss, train_stage

    masks = disks(300, seed=4)
    coarse = fit_codebook(PatchMaskTokenizer(PatchMaskTokenizerConfig(32, (1, 2, 4), 6)), masks)  # blocky
    refined = PatchMaskTokenizer(PatchMaskTokenizerConfig(32, (1, 2, 4), 6, refiner_channels=16))
    refined.codebook.copy_(coarse.codebook)
    test = disks(40, seed=9)
    codes = coarse.encode(test)
    neutral, plain = refined.decode(codes), coarse.decode(codes)  # zero-initialised: no change but a 1e-3 clamp
    torch.testing.assert_close(neutral, plain, atol=1.01e-3, rtol=0)
    assert torch.equal(neutral >= 0.5, plain >= 0.5)
    torch.manual_seed(0)
    train_stage("refine", refined, refiner_loss, masks.bool(), steps=150, batch_size=16, lr=3e-3, progress=False)
    for a, b in zip(codes, refined.encode(test), strict=True):
        assert torch.equal(a, b)  # codes are the codebook's alone: an LM trained on them stays valid

    def mean_dice(tok) -> float:
        prob = tok.decode(codes)
        return sum(dice((p >= 0.5).float(), t) for p, t in zip(prob, test, strict=True)) / len(test)

    before, after = mean_dice(coarse), mean_dice(refined)
    assert after > before + 0.02, (before, after)
    image = ImageTokenizer(ImageTokenizerConfig(32, 4, (4, 4), (8, 8, 8)))
    text = TextTokenizer.train(["lower left lung"], 280, 16)
    save_tokenizers(tmp_path, image, {"scale": refined}, text)
    loaded = load_tokenizers(tmp_path).masks["scale"]
    assert loaded.config.refiner_channels == 16
    torch.testing.assert_close(loaded.decode(codes), refined.decode(codes))
    with pytest.raises(ValueError, match="multiple of 4"):
        PatchMaskTokenizerConfig(28, (4,), 6, refiner_channels=8)  # 7 px patches


def test_chunked_kmeans_distance_is_the_whole_array_one() -> None:
    """k-means++ computes its distances in row chunks (memory); the numbers, and so the fitted codebook for
    a seed, are those of the whole-array expression."""
    x = torch.rand(20_000, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_squared_distance(x, x[7], chunk=999), (x - x[7]).pow(2).sum(1))
