"""save_tokenizers / load_tokenizers: round trip and clear errors for partial or mismatched directories."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from napari_mris.errors import ModelDirectoryError
from napari_mris.tokenizers import load_tokenizers, save_tokenizers
from napari_mris.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from napari_mris.tokenizers.patch import PatchMaskTokenizer, PatchMaskTokenizerConfig, fit_codebook
from napari_mris.tokenizers.text import TextTokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    image = ImageTokenizer(ImageTokenizerConfig(image_size=32, grid=4, fsq_levels=(4, 4), channels=(16, 32, 32)))
    training_masks = (torch.rand(8, 1, 32, 32) > 0.7).float()
    masks = {  # the raster one with a BorderRefiner, so that its weights travel too
        "raster": PatchMaskTokenizer(PatchMaskTokenizerConfig(32, (4,), codebook_size=16, refiner_channels=4)),
        "scale": PatchMaskTokenizer(PatchMaskTokenizerConfig(32, (1, 2, 4), codebook_size=16)),
    }
    for tokenizer in masks.values():
        fit_codebook(tokenizer, training_masks)
    text = TextTokenizer.train(["lower left lung", "upper right lung"], vocab_size=300, max_length=8)
    model_dir = tmp_path_factory.mktemp("model")
    save_tokenizers(model_dir, image.eval(), {k: v.eval() for k, v in masks.items()}, text)
    return model_dir, image, masks, text


def _copy(saved, tmp_path, name: str = "copy"):
    target = tmp_path / name
    shutil.copytree(saved[0], target)
    return target


def test_round_trip_gives_identical_codes(saved):
    model_dir, image, masks, text = saved
    loaded = load_tokenizers(model_dir)
    images = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded.image.encode(images), image.encode(images))
    mask = (torch.rand(2, 1, 32, 32) > 0.7).float()
    for order in ("raster", "scale"):
        assert all(
            torch.equal(a, b) for a, b in zip(loaded.masks[order].encode(mask), masks[order].encode(mask), strict=True)
        )
    torch.testing.assert_close(
        loaded.masks["raster"].decode(masks["raster"].encode(mask)),
        masks["raster"].decode(masks["raster"].encode(mask)),
    )
    assert loaded.text.encode("Lower left lung") == text.encode("lower left lung")
    assert loaded.text.max_length == 8


def test_config_sections_are_written(saved):
    config = json.loads((saved[0] / "config.json").read_text())
    assert config["image_size"] == 32
    assert config["mask_tokenizers"]["scale"]["scales"] == [1, 2, 4]
    assert config["image_tokenizer"]["fsq_levels"] == [4, 4]
    assert config["text"]["max_length"] == 8


@pytest.mark.parametrize("name", ["image_tokenizer.safetensors", "mask_tokenizer.safetensors", "tokenizer.json"])
def test_missing_file_is_named(saved, tmp_path, name):
    model_dir = _copy(saved, tmp_path)
    (model_dir / name).unlink()
    with pytest.raises(ModelDirectoryError, match=name):
        load_tokenizers(model_dir)


def test_mismatched_mask_config_names_the_weights_file(saved, tmp_path):
    model_dir = _copy(saved, tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["mask_tokenizers"]["raster"]["codebook_size"] = 12
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirectoryError, match="mask_tokenizer.safetensors does not match"):
        load_tokenizers(model_dir)


def test_a_learned_vq_mask_section_is_refused_by_name(saved, tmp_path):
    """A section without a kind is the removed learned-VQ tokenizer: refused in words, not by a KeyError."""
    model_dir = _copy(saved, tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    del config["mask_tokenizers"]["scale"]["kind"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirectoryError, match="mask_tokenizers.scale: mask tokenizer kind 'vq' is not supported"):
        load_tokenizers(model_dir)


def test_order_without_weights_is_reported(saved, tmp_path):
    model_dir = _copy(saved, tmp_path)
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(model_dir / "mask_tokenizer.safetensors").items() if k.startswith("raster.")}
    save_file(state, model_dir / "mask_tokenizer.safetensors")
    with pytest.raises(ModelDirectoryError, match="no weights for the 'scale' mask tokenizer"):
        load_tokenizers(model_dir)


def test_corrupt_weights_and_missing_section(saved, tmp_path):
    model_dir = _copy(saved, tmp_path)
    (model_dir / "image_tokenizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelDirectoryError, match="image_tokenizer.safetensors is not a readable"):
        load_tokenizers(model_dir)
    model_dir = _copy(saved, tmp_path, "second")
    config = json.loads((model_dir / "config.json").read_text())
    del config["mask_tokenizers"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirectoryError, match="'mask_tokenizers' section"):
        load_tokenizers(model_dir)
