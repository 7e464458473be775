"""The `decoder:` and `train:` sections of a recipe (`training/configs/*.yaml`) as dataclasses.

Unknown keys are errors, not silently ignored: a misspelt `het_strat` would otherwise quietly train the
wrong ablation. The tokenizer sections are read by `tokenizer_training`; they are passed through here.

The `decoder:` section has no dataclass of its own: its keys are the runtime's `DecoderConfig` fields (the
one declaration of the decoder's settings, stored in config.json), less those the tokenizers fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from napari_mris.errors import MRISError
from napari_mris.model.decoder import DecoderConfig
from napari_mris_train.losses import LossConfig


class ConfigError(MRISError):
    """A recipe file is missing, unreadable, or has keys or values the trainer does not understand."""


# DecoderConfig fields that follow from the tokenizers (trainer.build_decoder sets them): not recipe keys
DERIVED_DECODER_FIELDS = ("vocab_size", "max_position_embeddings", "n_scales")


def decoder_settings(values: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """A `decoder:` section as `DecoderConfig` keyword arguments, every settable field present.

    Unset keys take DecoderConfig's defaults, so a recipe, a checkpoint's snapshot of it and the built
    decoder all agree on one value per field; the cross-field rules are DecoderConfig's own, checked when
    the trainer builds it.
    """
    values = dict(values or {})
    settable = {f.name: f for f in dataclasses.fields(DecoderConfig) if f.name not in DERIVED_DECODER_FIELDS}
    fixed = sorted(set(values) & set(DERIVED_DECODER_FIELDS))
    if fixed:
        raise ConfigError(f"{where}: {fixed} follow from the tokenizers and cannot be set in a recipe")
    check_keys(values, settable, where)
    defaults = {
        name: f.default_factory() if f.default is dataclasses.MISSING else f.default for name, f in settable.items()
    }
    return {**defaults, **values}


STEM_WARMUP_PARTS = ("all", "map")


@dataclass
class TrainRecipe:
    steps: int = 20000
    batch_size: int = 8
    lr: float = 1.0e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 500
    min_lr: float = 1.0e-5
    grad_clip: float = 1.0
    eval_every: int = 1000
    val_images: int = 64  # fixed Val_Folder subset used for validation Dice during training
    checkpoint_every: int = 500
    orders: tuple[str, ...] = ("raster", "scale")
    absent_fraction: float = 0.15  # absent-target prompts -> [REJ]
    zone_fraction: float = 0.25  # zone-restricted prompts -> partial mask
    foreign_fraction: float = 0.05  # another image's description whose mask does not overlap -> [REJ]
    flip: bool = True  # horizontal flip with left/right swapped in the text
    wording_fraction: float = 0.0  # prompts put into a random radiology sentence (prompts.reword): free wording
    seed: int = 0
    stem_warmup_steps: int = 0  # stem-only steps on the lesion target before the decoder trains (0 = none)
    stem_warmup_lr: float = 1.0e-3
    # what the warm-up trains: "all" the stem (a first stage, from scratch), or only its "map" (the up-stages
    # and the lesion head), the encoder kept as loaded; "map" also runs after --init-from (trainer.warm_up_stem)
    stem_warmup_parts: str = "all"
    freeze_stem: bool = False  # keep the pixel stem (and its lesion map) as loaded: decoder-only training
    losses: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        fractions = self.absent_fraction + self.zone_fraction + self.foreign_fraction
        if min(self.absent_fraction, self.zone_fraction, self.foreign_fraction) < 0 or fractions > 1:
            raise ConfigError(
                f"train: absent_fraction + zone_fraction + foreign_fraction must be in [0, 1], got {fractions}"
            )
        if not 0 <= self.wording_fraction <= 1:
            raise ConfigError(f"train: wording_fraction must be in [0, 1], got {self.wording_fraction}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"train: steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.stem_warmup_steps < 0:
            raise ConfigError(f"train: stem_warmup_steps must be >= 0, got {self.stem_warmup_steps}")
        if self.stem_warmup_parts not in STEM_WARMUP_PARTS:
            raise ConfigError(
                f"train: stem_warmup_parts must be one of {list(STEM_WARMUP_PARTS)}, got {self.stem_warmup_parts!r}"
            )


@dataclass
class Recipe:
    name: str
    image_size: int
    decoder: dict[str, Any]  # DecoderConfig keyword arguments (decoder_settings)
    train: TrainRecipe
    path: Path | None = None
    sections: dict[str, Any] = field(default_factory=dict)  # the whole YAML, tokenizer sections included


def check_keys(values: dict[str, Any], known: Iterable[str], where: str) -> None:
    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {known}")


def _build(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    values = dict(values or {})
    check_keys(values, (f.name for f in dataclasses.fields(cls)), where)
    if cls is TrainRecipe and "losses" in values:
        values["losses"] = _build(LossConfig, values["losses"], f"{where}.losses")
    for key in ("orders", "betas"):
        if key in values and isinstance(values[key], list):
            values[key] = tuple(values[key])
    return cls(**values)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"recipe file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or "image_size" not in data:
        raise ConfigError(f"{path}: expected a mapping with at least image_size, decoder and train sections")
    return Recipe(
        name=str(data.get("name", path.stem)),
        image_size=int(data["image_size"]),
        decoder=decoder_settings(data.get("decoder"), f"{path}: decoder"),
        train=_build(TrainRecipe, data.get("train"), f"{path}: train"),
        path=path,
        sections=data,
    )
