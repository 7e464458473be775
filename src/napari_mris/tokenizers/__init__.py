"""Tokenizers: image, mask (raster and coarse-to-fine) and text, and their place in a model directory.

`save_tokenizers` / `load_tokenizers` write and read the tokenizer part of a model directory:
`image_tokenizer.safetensors`, `mask_tokenizer.safetensors` (keys prefixed by the decoding order,
`raster.` / `scale.`), `tokenizer.json`, and the `image_size`, `image_tokenizer`, `mask_tokenizers`
and `text` sections of `config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_mris.errors import ModelDirectoryError
from napari_mris.model.modeldir import (
    load_state_checked,
    load_weights,
    read_config,
    save_weights,
    update_config,
    verified_file,
)
from napari_mris.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from napari_mris.tokenizers.patch import PatchMaskTokenizer, PatchMaskTokenizerConfig
from napari_mris.tokenizers.preprocess import resize_probability, to_model_image
from napari_mris.tokenizers.text import TOKENIZER_FILE, TextTokenizer

__all__ = [
    "ORDERS",
    "ImageTokenizer",
    "ImageTokenizerConfig",
    "PatchMaskTokenizer",
    "PatchMaskTokenizerConfig",
    "TextTokenizer",
    "Tokenizers",
    "load_tokenizers",
    "resize_probability",
    "save_tokenizers",
    "to_model_image",
]

ORDERS = ("raster", "scale")
IMAGE_FILE = "image_tokenizer.safetensors"
MASK_FILE = "mask_tokenizer.safetensors"


@dataclass
class Tokenizers:
    image: ImageTokenizer
    masks: dict[str, PatchMaskTokenizer]  # decoding order -> tokenizer
    text: TextTokenizer


def save_tokenizers(
    model_dir: str | Path,
    image_tok: ImageTokenizer,
    mask_toks: dict[str, PatchMaskTokenizer],
    text_tok: TextTokenizer,
) -> None:
    """Write the three tokenizers into `model_dir` (weights, tokenizer.json, config sections)."""
    model_dir = Path(model_dir)
    unknown = set(mask_toks) - set(ORDERS)
    if not mask_toks or unknown:
        raise ValueError(f"mask tokenizers must be keyed by {ORDERS}, got {sorted(mask_toks)}")
    sizes = {image_tok.image_size, *(m.image_size for m in mask_toks.values())}
    if len(sizes) != 1:
        raise ValueError(f"image and mask tokenizers disagree on the image size: {sorted(sizes)}")
    model_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model_dir / IMAGE_FILE, image_tok.state_dict())
    save_weights(
        model_dir / MASK_FILE,
        {f"{order}.{key}": value for order, tok in mask_toks.items() for key, value in tok.state_dict().items()},
    )
    text_tok.save(model_dir / TOKENIZER_FILE)
    update_config(
        model_dir,
        image_size=image_tok.image_size,
        image_tokenizer={"kind": "fsq", **image_tok.config.to_dict()},
        mask_tokenizers={order: tok.config.to_dict() for order, tok in mask_toks.items()},
        text=text_tok.to_config(),
    )


def _section(config: dict[str, Any], name: str, model_dir: Path) -> Any:
    if name not in config:
        raise ModelDirectoryError(f"{model_dir / 'config.json'} has no '{name}' section (tokenizers not trained?)")
    return config[name]


def _load_image(model_dir: Path, section: dict[str, Any]) -> ImageTokenizer:
    section = dict(section)
    kind = section.pop("kind", "fsq")
    if kind != "fsq":
        raise ModelDirectoryError(f"{model_dir / 'config.json'}: unknown image tokenizer kind {kind!r}")
    try:
        tok = ImageTokenizer(ImageTokenizerConfig.from_dict(section))
    except (TypeError, ValueError) as exc:
        raise ModelDirectoryError(f"{model_dir / 'config.json'}: bad image_tokenizer section: {exc}") from exc
    load_state_checked(tok, load_weights(model_dir, IMAGE_FILE), model_dir / IMAGE_FILE)
    return tok.eval()


def _mask_tokenizer(section: dict[str, Any]) -> PatchMaskTokenizer:
    """A section of kind "patch"; one without a kind is a learned-VQ tokenizer, which is no longer supported."""
    kind = section.get("kind", "vq")
    if kind != "patch":
        raise ValueError(f"mask tokenizer kind {kind!r} is not supported (only 'patch'; learned VQ was removed)")
    return PatchMaskTokenizer(PatchMaskTokenizerConfig.from_dict(section))


def _load_masks(model_dir: Path, sections: dict[str, Any]) -> dict[str, PatchMaskTokenizer]:
    state = load_weights(model_dir, MASK_FILE)
    masks = {}
    for order, section in sections.items():
        if order not in ORDERS:
            raise ModelDirectoryError(f"{model_dir / 'config.json'}: unknown mask decoding order {order!r}")
        try:
            tok = _mask_tokenizer(section)
        except (TypeError, ValueError) as exc:
            raise ModelDirectoryError(f"{model_dir / 'config.json'}: bad mask_tokenizers.{order}: {exc}") from exc
        prefix = f"{order}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise ModelDirectoryError(f"{model_dir / MASK_FILE} has no weights for the '{order}' mask tokenizer")
        load_state_checked(tok, own, model_dir / MASK_FILE)
        masks[order] = tok.eval()
    extra = {k.split(".", 1)[0] for k in state} - set(sections)
    if extra:
        raise ModelDirectoryError(f"{model_dir / MASK_FILE} holds mask tokenizers {sorted(extra)} not in config.json")
    return masks


def load_tokenizers(model_dir: str | Path) -> Tokenizers:
    """Read the tokenizers of a model directory; a missing or mismatched file raises ModelDirectoryError."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    image_size = int(_section(config, "image_size", model_dir))
    image = _load_image(model_dir, _section(config, "image_tokenizer", model_dir))
    masks = _load_masks(model_dir, _section(config, "mask_tokenizers", model_dir))
    sizes = {image.image_size, *(m.image_size for m in masks.values())}
    if sizes != {image_size}:
        raise ModelDirectoryError(f"{model_dir / 'config.json'}: tokenizer image sizes {sorted(sizes)} != {image_size}")
    text_section = _section(config, "text", model_dir)
    text_path = verified_file(model_dir, text_section.get("file", TOKENIZER_FILE))
    text = TextTokenizer.from_file(text_path, max_length=int(text_section["max_length"]))
    if "vocab_size" in text_section and text.vocab_size != int(text_section["vocab_size"]):
        raise ModelDirectoryError(
            f"{text_path} has {text.vocab_size} tokens but config.json says {text_section['vocab_size']}"
        )
    return Tokenizers(image=image, masks=masks, text=text)
