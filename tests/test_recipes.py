"""Every recipe in training/configs builds at full size, so that none can silently rot.

A GPU recipe is only run where a GPU is, long after it was written; a wrong key, a removed kind or sizes that
do not fit together would surface hours into a run. Here each recipe is read by the same code the trainers
use (strict keys), its tokenizers are built from its own sections (untrained, on the CPU; their configs validated), and
its decoder is built by `trainer.build_decoder` on the meta device (no memory, no time) and run once there,
so that shapes that do not fit together (stem grid, heads, image tokens) fail here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from napari_mris.model.decoder import DecoderConfig
from napari_mris.model.sequence import IMAGE_START
from napari_mris.tokenizers import Tokenizers, load_tokenizers
from napari_mris.tokenizers.image import ImageTokenizer
from napari_mris.tokenizers.patch import PatchMaskTokenizer
from napari_mris.tokenizers.text import PROMPT_VOCABULARY, TextTokenizer
from napari_mris_train.config import ConfigError, Recipe, load_recipe
from napari_mris_train.tokenizer_training import recipe_from_sections
from napari_mris_train.trainer import build_decoder, freeze_pixel_stem, vocab_layout

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "training" / "configs").glob("*.yaml"))
SHIPPED = REPO / "src" / "napari_mris" / "models" / "default"
TOKENIZER_SECTIONS = ("image_tokenizer", "mask_tokenizer", "text_tokenizer")


def recipe_tokenizers(recipe: Recipe) -> Tokenizers:
    """The recipe's own tokenizers, untrained; a recipe without tokenizer sections (a second stage that
    starts `--init-from` a model) gets the shipped model's, the model it is documented to start from."""
    if not any(name in recipe.sections for name in TOKENIZER_SECTIONS):
        return load_tokenizers(SHIPPED)
    sections = recipe_from_sections(recipe.sections, str(recipe.path))
    image = ImageTokenizer(sections.image_config())  # on the CPU: FSQ reads its levels back (a few M weights)
    masks = {order: PatchMaskTokenizer(sections.mask_config(order)) for order in recipe.train.orders}
    text = TextTokenizer.train(PROMPT_VOCABULARY, sections.text.vocab_size, sections.text.max_length)
    return Tokenizers(image=image, masks=masks, text=text)


def build_on_meta(path: Path):
    """(recipe, tokenizers, decoder) of a recipe file: the decoder built and run once on the meta device, and
    the sizes that must agree across sections checked (an AssertionError naming the mismatch)."""
    recipe = load_recipe(path)
    tokenizers = recipe_tokenizers(recipe)
    layout = vocab_layout(tokenizers)
    with torch.device("meta"):
        decoder = build_decoder(recipe, tokenizers, layout)
        if recipe.train.freeze_stem:
            freeze_pixel_stem(decoder)
        grid, size = tokenizers.image.grid, recipe.image_size
        length = IMAGE_START + grid * grid + 1 + tokenizers.text.max_length
        causal = torch.zeros(2, 1, length, length)  # additive; transformers' own causal mask reads values back
        ids, pixels = torch.zeros(2, length, dtype=torch.long), torch.zeros(2, 1, size, size)
        out = decoder(ids, attention_mask=causal, pixel_values=pixels)
    assert out.logits.shape == (2, length, layout.vocab_size)
    assert all(p.is_meta for p in decoder.parameters())
    sizes = {tok.image_size for tok in tokenizers.masks.values()} | {tokenizers.image.image_size}
    assert sizes == {size}, f"tokenizer image sizes {sizes} differ from image_size {size}"
    raster = tokenizers.masks["raster"].scales[-1]
    assert raster == grid, f"the raster mask grid {raster} is not the image grid {grid}"  # cell over cell
    stem = decoder.pixel_stem
    if stem is not None:
        assert size // stem.downsample == grid, f"the pixel stem's grid {size // stem.downsample} is not {grid}"
    if recipe.train.stem_warmup_steps or (stem is not None and recipe.train.losses.lesion_weight > 0):
        assert stem is not None and stem.lesion_map is not None, "the lesion target needs a U-Net lesion map"
    return recipe, tokenizers, decoder


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_builds_at_full_size(path):
    recipe, tokenizers, decoder = build_on_meta(path)
    assert sum(p.numel() for p in decoder.parameters()) > 0
    assert set(tokenizers.masks) == set(recipe.train.orders)


def kinds(recipe: Recipe) -> dict[str, object]:
    """What a recipe is made of, whatever its sizes."""
    decoder, train, mask = recipe.decoder, recipe.train, recipe.sections.get("mask_tokenizer", {})
    losses = train.losses
    return {
        "pixel stem": bool(decoder["pixel_channels"]),
        "U-Net lesion map": bool(decoder["pixel_decoder_channels"]),
        "cell features": decoder["cell_features"],
        "cell positions": decoder["cell_positions"],
        "text slots = text length": decoder["text_slots"] == recipe.sections["text_tokenizer"]["max_length"],
        "border refiner": mask.get("refiner_channels", 0) > 0,
        "orders": train.orders,
        "stem warm-up": train.stem_warmup_steps > 0,
        "losses": (losses.tcl, losses.nktp, losses.het, losses.lesion_weight > 0),
    }


def test_the_paper_recipe_is_the_default_recipe_scaled_up():
    """The GPU recipe is the recipe that made the shipped model work, at paper scale: its kinds equal the
    default recipe's (a kind added to one must be added to the other) and its sizes are the paper's."""
    default, paper = (load_recipe(REPO / "training" / "configs" / f"{name}.yaml") for name in ("default", "paper"))
    assert kinds(paper) == kinds(default)
    assert paper.image_size == 256 and paper.sections["image_tokenizer"]["grid"] == 32
    assert paper.sections["mask_tokenizer"]["raster_scales"] == [32]
    _, _, decoder = build_on_meta(paper.path)
    billions = sum(p.numel() for p in decoder.parameters()) / 1e9
    assert 0.2 < billions < 1.0, billions  # a few hundred million parameters, not the CPU recipe's few million


@pytest.mark.parametrize("name", ["default", "referring"])
def test_the_shipped_models_recipes_build_the_shipped_decoder(name):
    """default.yaml (the first stage) and referring.yaml (the second, `--init-from` the first) describe the
    shipped model: with its tokenizers they build exactly its decoder configuration."""
    recipe = load_recipe(REPO / "training" / "configs" / f"{name}.yaml")
    tokenizers = load_tokenizers(SHIPPED)
    with torch.device("meta"):
        decoder = build_decoder(recipe, tokenizers, vocab_layout(tokenizers))
    shipped = json.loads((SHIPPED / "config.json").read_text(encoding="utf-8"))["decoder"]
    assert decoder.config == DecoderConfig.from_dict(shipped)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("decoder", "pixel_decoder_channel", [128, 64], "unknown keys"),  # a misspelt key
        ("mask_tokenizer", "kind", "vq", "unknown keys"),  # the removed learned-VQ kind
        ("decoder", "num_key_value_heads", 5, "num_key_value_heads"),  # heads that do not divide
        ("decoder", "pixel_channels", [32, 64, 128, 256], "pixel stem's grid 16 is not 32"),  # one stage too many
        ("decoder", "pixel_decoder_channels", [], "needs a U-Net lesion map"),  # the warm-up has nothing to fit
        ("mask_tokenizer", "raster_scales", [16], "raster mask grid 16 is not the image grid 32"),
        ("image_tokenizer", "grid", 30, "multiple of the grid"),
        ("text_tokenizer", "max_length", 80, "text_slots 64 is shorter"),
        ("train", "stem_warmup_steps", -1, "stem_warmup_steps must be >= 0"),
        ("train", "stem_warmup_parts", "encoder", "stem_warmup_parts must be one of"),
    ],
)
def test_a_broken_recipe_fails_the_build(tmp_path, section, key, value, message):
    """The build above is not a formality: a wrong key, a removed kind or sizes that do not fit fail it."""
    data = yaml.safe_load((REPO / "training" / "configs" / "paper.yaml").read_text(encoding="utf-8"))
    data[section][key] = value
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises((ConfigError, ValueError, AssertionError, RuntimeError), match=message):
        build_on_meta(broken)
