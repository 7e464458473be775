"""Tokenizer training end to end on phantoms (tiny recipe, seconds): model directory, resume, eval, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from napari_mris.phantom import write_lvit_dataset
from napari_mris.tokenizers import load_tokenizers
from napari_mris_train.cli import main
from napari_mris_train.data import load_split
from napari_mris_train.tokenizer_training import (
    evaluate_tokenizers,
    load_tokenizer_recipe,
    mask_loss,
    preload,
    train_stage,
    train_tokenizers,
)

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_lvit_dataset(tmp_path_factory.mktemp("lvit"), n_train=12, n_val=4, size=32, seed=3)


@pytest.fixture(scope="module")
def recipe():
    """The tiny recipe with the learned-VQ mask tokenizer (its trainer is what most tests here exercise;
    the GPU `paper` recipe uses it); the shipped patch kind is fitted in test_tokenizers_patch.py."""
    tiny = load_tokenizer_recipe(TINY)
    return replace(tiny, mask=replace(tiny.mask, kind="vq"))


def test_train_writes_a_loadable_model_directory(phantoms, recipe, tmp_path):
    tokenizers = train_tokenizers(recipe, load_split(phantoms, split="train"), tmp_path, steps=6, progress=False)
    for name in ("config.json", "image_tokenizer.safetensors", "mask_tokenizer.safetensors", "tokenizer.json"):
        assert (tmp_path / name).is_file()
    for stage in ("raster", "scale", "image"):
        assert json.loads((tmp_path / "checkpoints" / f"{stage}.json").read_text())["step"] == 6
    assert set(tokenizers.masks) == {"raster", "scale"}
    val = preload(load_split(phantoms, split="val"), recipe.image_size, progress=False)
    results = evaluate_tokenizers(tokenizers, val)
    assert results["n_images"] == 4
    assert len(results["scale"]["dice_after_scales"]) == len(recipe.mask.scale_scales)
    assert 0 <= results["raster"]["dice_mean"] <= 1 and results["image"]["psnr_mean"] > 0


def test_training_lowers_the_mask_loss(phantoms, recipe):
    from napari_mris.tokenizers.mask import MaskTokenizer

    data = preload(load_split(phantoms, split="train"), recipe.image_size, progress=False)
    torch.manual_seed(0)
    model = MaskTokenizer(recipe.mask_config("raster"))
    batch = data.masks[:8].float()
    model.train()
    with torch.no_grad():
        before = mask_loss(model, batch)[0].item()
    train_stage("raster", model, mask_loss, data.masks, steps=25, batch_size=8, lr=3e-3, progress=False)
    model.train()
    with torch.no_grad():
        after = mask_loss(model, batch)[0].item()
    assert after < 0.8 * before


def test_resume_after_a_crash_continues_exactly(phantoms, recipe, tmp_path):
    from napari_mris.tokenizers.mask import MaskTokenizer

    data = preload(load_split(phantoms, split="train"), recipe.image_size, progress=False)
    kwargs = dict(steps=6, batch_size=4, lr=2e-3, checkpoint_every=3, progress=False)
    torch.manual_seed(0)
    straight = train_stage(
        "raster", MaskTokenizer(recipe.mask_config("raster")), mask_loss, data.masks, ckpt_dir=tmp_path / "a", **kwargs
    )
    calls = []

    def crashing_loss(model, batch):
        calls.append(1)
        if len(calls) == 5:  # dies during step 5, after the checkpoint at step 3
            raise KeyboardInterrupt
        return mask_loss(model, batch)

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train_stage(
            "raster",
            MaskTokenizer(recipe.mask_config("raster")),
            crashing_loss,
            data.masks,
            ckpt_dir=tmp_path / "b",
            **kwargs,
        )
    assert json.loads((tmp_path / "b" / "raster.json").read_text())["step"] == 3
    resumed = train_stage(
        "raster",
        MaskTokenizer(recipe.mask_config("raster")),
        mask_loss,
        data.masks,
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


def test_multiscale_loss_trains_the_coarse_previews(recipe):
    from napari_mris.tokenizers.mask import MaskTokenizer
    from napari_mris_train.tokenizer_training import coarse_target

    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, :, :16] = 1
    torch.testing.assert_close(coarse_target(masks, 1), torch.full_like(masks, 0.5))
    torch.testing.assert_close(coarse_target(masks, 32), masks)
    torch.manual_seed(0)
    _, logs = mask_loss(MaskTokenizer(recipe.mask_config("scale")).train(), masks)
    assert "coarse" in logs
    _, logs = mask_loss(MaskTokenizer(recipe.mask_config("raster")).train(), masks)
    assert "coarse" not in logs  # a single-scale tokenizer has no preview


def test_refine_decoders_keeps_every_code_and_sharpens_the_masks(phantoms, tmp_path):
    out = tmp_path / "model"
    vq = tmp_path / "tiny_vq.yaml"  # the learned-VQ kind: its decoder is what --refine-decoders fine-tunes
    vq.write_text(TINY.read_text().replace("kind: patch", "kind: vq"))
    args = ["tokenizers", "--config", str(vq), "--data", str(phantoms), "--out", str(out), "--threads", "1"]
    assert main([*args, "--steps", "3"]) == 0  # barely trained: the decoder has room to improve
    before = load_tokenizers(out)
    masks = preload(load_split(phantoms, split="train"), 32, progress=False).masks[:6].float()
    codes_before = {order: tok.encode(masks) for order, tok in before.masks.items()}
    loss_before = {order: mask_loss(tok.eval(), masks)[1]["bce"] for order, tok in before.masks.items()}
    assert main([*args, "--refine-decoders", "--steps", "30"]) == 0
    after = load_tokenizers(out)
    for order, tok in after.masks.items():
        for a, b in zip(codes_before[order], tok.encode(masks), strict=True):
            assert torch.equal(a, b), f"{order}: refining the decoder changed the codes"
        assert mask_loss(tok.eval(), masks)[1]["bce"] < loss_before[order]
        torch.testing.assert_close(tok.quantizer.codebook, before.masks[order].quantizer.codebook)
    assert json.loads((out / "checkpoints" / "refine-scale.json").read_text())["step"] == 30
