"""Emu3ImageTokenizer on a tiny randomly initialised Emu3VQVAE saved to disk (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers import Emu3VQVAE, Emu3VQVAEConfig

from napari_mris.errors import ModelDirectoryError
from napari_mris.tokenizers.emu3 import Emu3ImageTokenizer


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    # DESIGN section 9: base_channels a multiple of 32 and hidden_size == base_channels * channel_multiplier[-1]
    config = Emu3VQVAEConfig(
        codebook_size=64,
        embed_dim=4,
        latent_channels=4,
        base_channels=32,
        channel_multiplier=[1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        hidden_size=32,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("emu3")
    Emu3VQVAE(config).save_pretrained(folder)
    return folder


def test_encode_decode_through_the_common_interface(emu3_dir):
    tok = Emu3ImageTokenizer.from_pretrained(emu3_dir, image_size=32)
    assert tok.codebook_size == 64 and tok.grid == 16
    images = torch.rand(2, 1, 32, 32)
    codes = tok.encode(images)
    assert codes.shape == (2, 256) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    assert torch.equal(codes, tok.encode(images))
    out = tok.decode(codes)
    assert out.shape == (2, 1, 32, 32)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_normalisation_follows_the_preprocessor_config(emu3_dir, tmp_path):
    import shutil

    folder = tmp_path / "emu3"
    shutil.copytree(emu3_dir, folder)
    (folder / "preprocessor_config.json").write_text('{"image_mean": 0.5, "image_std": 0.5}')
    tok = Emu3ImageTokenizer.from_pretrained(folder, image_size=32)
    assert tok.mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_bad_folder_and_sizes(emu3_dir, tmp_path):
    with pytest.raises(ModelDirectoryError, match="config.json is missing"):
        Emu3ImageTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="spatial factor"):
        Emu3ImageTokenizer.from_pretrained(emu3_dir, image_size=31)
    tok = Emu3ImageTokenizer.from_pretrained(emu3_dir, image_size=32)
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        tok.encode(torch.rand(1, 3, 32, 32))
