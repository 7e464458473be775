"""Tokenizer training end to end on phantoms (tiny recipe, seconds): model directory, resume, eval, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from napari_mris.phantom import write_lvit_dataset
from napari_mris.tokenizers import load_tokenizers
from napari_mris.tokenizers.image import ImageTokenizer
from napari_mris.tokenizers.patch import PatchMaskTokenizer
from napari_mris_train.checkpoint import load_checkpoint
from napari_mris_train.cli import main
from napari_mris_train.config import ConfigError
from napari_mris_train.data import load_split
from napari_mris_train.schedule import learning_rate
from napari_mris_train.tokenizer_training import (
    MIN_LR_FRACTION,
    evaluate_tokenizers,
    image_loss,
    load_tokenizer_recipe,
    preload,
    refiner_loss,
    train_stage,
    train_tokenizers,
)

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_lvit_dataset(tmp_path_factory.mktemp("lvit"), n_train=12, n_val=4, size=32, seed=3)


@pytest.fixture(scope="module")
def recipe():
    """The tiny recipe with a BorderRefiner on both mask tokenizers (the shipped kind has one)."""
    tiny = load_tokenizer_recipe(TINY)
    return replace(tiny, mask=replace(tiny.mask, refiner_channels=8))


@pytest.fixture(scope="module")
def train_data(phantoms, recipe):
    return preload(load_split(phantoms, split="train"), recipe.image_size, progress=False)


def test_train_writes_a_loadable_model_directory(phantoms, recipe, train_data, tmp_path):
    tokenizers = train_tokenizers(recipe, train_data, tmp_path, steps=6, progress=False)
    for name in ("config.json", "image_tokenizer.safetensors", "mask_tokenizer.safetensors", "tokenizer.json"):
        assert (tmp_path / name).is_file()
    for stage in ("image", "refine-raster", "refine-scale"):  # checkpoint.py folders, one per trained stage
        assert load_checkpoint(tmp_path / "checkpoints" / stage)[1]["step"] == 6
    assert set(tokenizers.masks) == {"raster", "scale"}
    assert all(tok.refiner is not None for tok in tokenizers.masks.values())
    val = preload(load_split(phantoms, split="val"), recipe.image_size, progress=False)
    results = evaluate_tokenizers(tokenizers, val)
    assert results["n_images"] == 4
    assert len(results["scale"]["dice_after_scales"]) == len(recipe.mask.scale_scales)
    assert 0 <= results["raster"]["dice_mean"] <= 1 and results["image"]["psnr_mean"] > 0


def test_training_lowers_the_image_loss(recipe, train_data):
    torch.manual_seed(0)
    model = ImageTokenizer(recipe.image_config())
    batch = train_data.images[:8].float()
    with torch.no_grad():
        before = image_loss(model, batch)[0].item()
    train_stage("image", model, image_loss, train_data.images, steps=25, batch_size=8, lr=3e-3, progress=False)
    with torch.no_grad():
        after = image_loss(model, batch)[0].item()
    assert after < 0.8 * before


def test_the_schedule_is_the_decoder_trainers(recipe, train_data, monkeypatch):
    """One learning-rate schedule: the tokenizer stages call `schedule.learning_rate` (5 % warm-up, cosine to
    10 % of the peak), the same function the decoder trainer uses."""
    seen = []
    monkeypatch.setattr(
        "napari_mris_train.tokenizer_training.learning_rate", lambda *a: seen.append(a) or learning_rate(*a)
    )
    model = ImageTokenizer(recipe.image_config())
    train_stage("image", model, image_loss, train_data.images, steps=40, batch_size=2, lr=1e-3, progress=False)
    assert seen[0] == (0, 40, 1e-3, 1e-3 * MIN_LR_FRACTION, 2) and len(seen) == 40
    assert learning_rate(*seen[-1]) == pytest.approx(1e-4, rel=0.05)  # the last step ends near 10 % of the peak


def test_resume_after_a_crash_continues_exactly(recipe, train_data, tmp_path):
    kwargs = dict(steps=6, batch_size=4, lr=2e-3, checkpoint_every=3, progress=False)
    torch.manual_seed(0)
    straight = train_stage(
        "image", ImageTokenizer(recipe.image_config()), image_loss, train_data.images, ckpt_dir=tmp_path / "a", **kwargs
    )
    calls = []

    def crashing_loss(model, batch):
        calls.append(1)
        if len(calls) == 5:  # dies during step 5, after the checkpoint at step 3
            raise KeyboardInterrupt
        return image_loss(model, batch)

    torch.manual_seed(0)
    fresh = ImageTokenizer(recipe.image_config())
    with pytest.raises(KeyboardInterrupt):
        train_stage("image", fresh, crashing_loss, train_data.images, ckpt_dir=tmp_path / "b", **kwargs)
    assert load_checkpoint(tmp_path / "b" / "image")[1]["step"] == 3
    torch.manual_seed(1)  # another initialisation: the checkpoint must replace it entirely
    resumed = train_stage(
        "image",
        ImageTokenizer(recipe.image_config()),
        image_loss,
        train_data.images,
        ckpt_dir=tmp_path / "b",
        resume=True,
        **kwargs,
    )
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=f"{name} differs after resuming")


def test_cli_train_then_eval(phantoms, tmp_path, capsys):
    out = tmp_path / "model"
    args = ["tokenizers", "--config", str(TINY), "--data", str(phantoms), "--out", str(out), "--steps", "2"]
    assert main([*args, "--threads", "1"]) == 0
    load_tokenizers(out)
    figure = tmp_path / "fig.png"
    assert main([*args, "--eval", "--figure", str(figure)]) == 0
    printed = capsys.readouterr().out
    assert "Dice after each scale" in printed and "PSNR" in printed
    assert json.loads((out / "tokenizer_eval.json").read_text())["n_images"] == 4
    assert figure.stat().st_size > 1000


def test_stages_left_out_keep_the_model_directorys_tokenizers(recipe, train_data, tmp_path):
    first = train_tokenizers(recipe, train_data, tmp_path, steps=2, progress=False)
    files = {name: (tmp_path / name).read_bytes() for name in ("mask_tokenizer.safetensors", "tokenizer.json")}
    again = train_tokenizers(replace(recipe, seed=5), train_data, tmp_path, steps=3, stages=("image",), progress=False)
    assert {name: (tmp_path / name).read_bytes() for name in files} == files  # text and masks kept as they were
    assert not torch.equal(again.image.encoder.net[1].weight, first.image.encoder.net[1].weight)
    with pytest.raises(ConfigError, match="unknown stages"):
        train_tokenizers(recipe, train_data, tmp_path, stages=("image", "vq"), progress=False)


def test_refine_decoders_keeps_every_code_and_sharpens_the_masks(phantoms, tmp_path):
    out = tmp_path / "model"
    args = ["tokenizers", "--config", str(TINY), "--data", str(phantoms), "--out", str(out), "--threads", "1"]
    assert main([*args, "--steps", "2"]) == 0  # the tiny recipe: codebooks without a refiner
    before = load_tokenizers(out)
    assert all(tok.refiner is None for tok in before.masks.values())
    masks = preload(load_split(phantoms, split="train"), 32, progress=False).masks[:6].float()
    codes_before = {order: tok.encode(masks) for order, tok in before.masks.items()}
    refined_recipe = tmp_path / "refined.yaml"
    refined_recipe.write_text(TINY.read_text().replace("codebook_size: 32", "codebook_size: 32\n  refiner_channels: 8"))
    args[2] = str(refined_recipe)
    assert main([*args, "--refine-decoders", "--steps", "60"]) == 0
    after = load_tokenizers(out)
    for order, tok in after.masks.items():
        for a, b in zip(codes_before[order], tok.encode(masks), strict=True):
            assert torch.equal(a, b), f"{order}: refining changed the codes"
        torch.testing.assert_close(tok.codebook, before.masks[order].codebook)
        neutral = PatchMaskTokenizer(tok.config)  # the same codebook with an untrained (identity) refiner
        neutral.codebook.copy_(tok.codebook)
        losses = []
        for model in (tok, neutral):
            torch.manual_seed(0)  # the same scales drawn for both
            with torch.no_grad():
                losses.append(sum(refiner_loss(model, masks)[0].item() for _ in range(4)))
        assert losses[0] < losses[1], order
    assert load_checkpoint(out / "checkpoints" / "refine-scale")[1]["step"] == 60
