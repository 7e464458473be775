"""The `decoder:` and `train:` sections of a recipe (`training/configs/*.yaml`) as dataclasses.

Unknown keys are errors, not silently ignored: a misspelt `het_strat` would otherwise quietly train the
wrong ablation. The tokenizer sections are read by `tokenizer_training`; they are passed through here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from napari_mris.errors import MRISError
from napari_mris_train.losses import LossConfig


class ConfigError(MRISError):
    """A recipe file is missing, unreadable, or has keys or values the trainer does not understand."""


@dataclass
class DecoderRecipe:
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int = 704
    dropout: float = 0.1
    nktp_k: int = 16
    pixel_channels: list[int] = field(default_factory=list)  # pixel stem stages (pixel_stem.py); [] = tokens only
    text_slots: int = 0  # fixed RoPE positions for the text (sequence.position_shift); 0 = plain positions
    cell_features: bool = False  # each mask position also gets its own cell's stem feature (sequence.code_cells)
    pixel_decoder_channels: list[int] = field(default_factory=list)  # U-Net up-stages on the stem (pixel_stem.py)
    cell_positions: bool = False  # each cell feature also gets its (row, column) code (decoder.cell_position_codes)


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
    seed: int = 0
    stem_warmup_steps: int = 0  # stem-only steps on the lesion target before the decoder trains (0 = none)
    stem_warmup_lr: float = 1.0e-3
    freeze_stem: bool = False  # keep the pixel stem (and its lesion map) as loaded: decoder-only training
    losses: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        fractions = self.absent_fraction + self.zone_fraction + self.foreign_fraction
        if min(self.absent_fraction, self.zone_fraction, self.foreign_fraction) < 0 or fractions > 1:
            raise ConfigError(
                f"train: absent_fraction + zone_fraction + foreign_fraction must be in [0, 1], got {fractions}"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"train: steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.stem_warmup_steps < 0:
            raise ConfigError(f"train: stem_warmup_steps must be >= 0, got {self.stem_warmup_steps}")


@dataclass
class Recipe:
    name: str
    image_size: int
    decoder: DecoderRecipe
    train: TrainRecipe
    path: Path | None = None
    sections: dict[str, Any] = field(default_factory=dict)  # the whole YAML, tokenizer sections included


def _build(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")
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
        decoder=_build(DecoderRecipe, data.get("decoder"), f"{path}: decoder"),
        train=_build(TrainRecipe, data.get("train"), f"{path}: train"),
        path=path,
        sections=data,
    )
