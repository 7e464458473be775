"""`napari-mris-train tokenizers`: train (or `--eval`) the image, mask and text tokenizers.

Four stages, each resumable on its own: the BPE text tokenizer (seconds), the raster (single-scale) and
the coarse-to-fine (multi-scale) mask tokenizers, and the FSQ image tokenizer. Training uses the
Train_Folder only; `--eval` measures on Val_Folder at the masks' own resolution. The split is read into
memory once (5,716 QaTa pairs at 224x224 are ~0.4 GB as float16) so steps cost only the networks.

Checkpoints (`<out>/checkpoints/<stage>.safetensors` + `<stage>.json`) hold the weights, the optimizer
state and the RNG state as tensors, and the step as JSON: no pickle anywhere.
"""

from __future__ import annotations

import os

# On a shared, oversubscribed CPU, OpenMP threads that spin while waiting make each step many times slower
# (measured here: 12 s instead of 0.57 s for one default mask step on 2 threads). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from napari_mris.errors import ModelDirectoryError
from napari_mris.io.atomic import write_text_atomic
from napari_mris.model.modeldir import load_state_checked, load_weights, save_weights
from napari_mris.tokenizers import Tokenizers, load_tokenizers, save_tokenizers
from napari_mris.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from napari_mris.tokenizers.mask import MaskTokenizer, MaskTokenizerConfig
from napari_mris.tokenizers.patch import PatchMaskTokenizer, PatchMaskTokenizerConfig, fit_codebook
from napari_mris.tokenizers.preprocess import to_model_image
from napari_mris.tokenizers.text import TextTokenizer
from napari_mris_train.config import ConfigError, load_recipe
from napari_mris_train.data import LViTSplit, load_split

STAGES = ("text", "raster", "scale", "image")
EVAL_FILE = "tokenizer_eval.json"


# ----------------------------------------------------------------------------- recipe


@dataclass
class ImageRecipe:
    grid: int = 14
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    channels: tuple[int, ...] = (32, 64, 128)
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3


@dataclass
class MaskRecipe:
    kind: str = "vq"  # "vq": learned VQ autoencoder (mask.py); "patch": k-means patch codebook (patch.py)
    raster_scales: tuple[int, ...] = (14,)
    scale_scales: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 10, 14)
    latent_dim: int = 16
    codebook_size: int = 1024
    channels: tuple[int, ...] = (64, 128)
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    refiner_channels: int = 0  # kind patch: width of the BorderRefiner (0 = none), trained with the codes frozen
    refiner_steps: int = 600


@dataclass
class TextRecipe:
    vocab_size: int = 1000
    max_length: int = 48


@dataclass
class TokenizerRecipe:
    image_size: int = 224
    image: ImageRecipe = field(default_factory=ImageRecipe)
    mask: MaskRecipe = field(default_factory=MaskRecipe)
    text: TextRecipe = field(default_factory=TextRecipe)
    checkpoint_every: int = 100
    seed: int = 0

    def image_config(self) -> ImageTokenizerConfig:
        r = self.image
        return ImageTokenizerConfig(self.image_size, r.grid, r.fsq_levels, r.channels)

    def mask_config(self, order: str) -> MaskTokenizerConfig | PatchMaskTokenizerConfig:
        r = self.mask
        scales = r.raster_scales if order == "raster" else r.scale_scales
        if r.kind == "patch":
            return PatchMaskTokenizerConfig(self.image_size, scales, r.codebook_size, r.refiner_channels)
        if r.kind != "vq":
            raise ConfigError(f"mask_tokenizer.kind must be 'vq' or 'patch', got {r.kind!r}")
        return MaskTokenizerConfig(self.image_size, scales, r.latent_dim, r.codebook_size, r.channels)

    def stage_steps(self, stage: str) -> int:
        return self.image.steps if stage == "image" else self.mask.steps

    def with_steps(self, steps: int) -> TokenizerRecipe:
        """The same recipe with every stage's step count overridden (`--steps`)."""
        image, mask = ImageRecipe(**asdict(self.image)), MaskRecipe(**asdict(self.mask))
        image.steps = mask.steps = steps
        return TokenizerRecipe(self.image_size, image, mask, self.text, self.checkpoint_every, self.seed)


def _section(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    values = dict(values or {})
    known = {f.name for f in cls.__dataclass_fields__.values()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def recipe_from_sections(sections: dict[str, Any], where: str = "recipe") -> TokenizerRecipe:
    """The tokenizer part of a recipe mapping (`image_size` and the three `*_tokenizer` sections)."""
    return TokenizerRecipe(
        image_size=int(sections["image_size"]),
        image=_section(ImageRecipe, sections.get("image_tokenizer"), f"{where}: image_tokenizer"),
        mask=_section(MaskRecipe, sections.get("mask_tokenizer"), f"{where}: mask_tokenizer"),
        text=_section(TextRecipe, sections.get("text_tokenizer"), f"{where}: text_tokenizer"),
    )


def load_tokenizer_recipe(path: str | Path) -> TokenizerRecipe:
    return recipe_from_sections(load_recipe(path).sections, str(path))


# ----------------------------------------------------------------------------- data


@dataclass
class Preloaded:
    """A split in memory at model resolution; `masks_native` keeps each mask at its own size for eval."""

    images: torch.Tensor  # (N, 1, S, S) float16 in [0, 1], exactly as the pipeline preprocesses a slice
    masks: torch.Tensor  # (N, 1, S, S) bool, area-resized and cut at 0.5
    masks_native: list[np.ndarray]
    descriptions: list[str]
    names: list[str]


def preload(split: LViTSplit, size: int, limit: int | None = None, progress: bool = True) -> Preloaded:
    n = len(split) if limit is None else min(limit, len(split))
    images = torch.empty(n, 1, size, size, dtype=torch.float16)
    masks = torch.empty(n, 1, size, size, dtype=torch.bool)
    native = []
    for i in tqdm(range(n), desc=f"reading {split.folder.name}", disable=not progress, mininterval=5):
        example = split[i]
        images[i, 0] = torch.from_numpy(to_model_image(example.image, None, size))
        m = torch.from_numpy(example.mask.astype(np.float32))[None, None]
        if m.shape[-2:] != (size, size):
            m = F.interpolate(m, size=(size, size), mode="area")
        masks[i, 0] = m[0, 0] >= 0.5
        native.append(example.mask)
    return Preloaded(images, masks, native, split.descriptions[:n], split.names[:n])


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_paths(ckpt_dir: Path, stage: str) -> tuple[Path, Path]:
    return ckpt_dir / f"{stage}.safetensors", ckpt_dir / f"{stage}.json"


def save_checkpoint(
    ckpt_dir: Path, stage: str, module: nn.Module, opt: torch.optim.Optimizer, step: int, batches: torch.Generator
) -> None:
    """Weights, optimizer moments and RNG states as safetensors; step and optimizer scalars as JSON."""
    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    opt_state = opt.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.batches"] = batches.get_state()
    tensor_path, json_path = _checkpoint_paths(ckpt_dir, stage)
    save_weights(tensor_path, tensors)
    meta = {"stage": stage, "step": step, "param_groups": opt_state["param_groups"]}
    write_text_atomic(json_path, json.dumps(meta, indent=2) + "\n")


def load_checkpoint(
    ckpt_dir: Path, stage: str, module: nn.Module, opt: torch.optim.Optimizer, batches: torch.Generator | None = None
) -> int:
    """Restore a stage's checkpoint into `module`, `opt` (and the batch sampler); returns the step reached."""
    tensor_path, json_path = _checkpoint_paths(ckpt_dir, stage)
    tensors = load_weights(ckpt_dir, tensor_path.name)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirectoryError(f"{json_path} is missing or not valid JSON: {exc}") from exc
    load_state_checked(module, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, tensor_path)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise ModelDirectoryError(f"{tensor_path}: optimizer state does not match this recipe: {exc}") from exc
    torch.set_rng_state(tensors["rng.torch"])
    if batches is not None:
        batches.set_state(tensors["rng.batches"])
    return int(meta["step"])


def checkpoint_step(ckpt_dir: Path, stage: str) -> int | None:
    json_path = _checkpoint_paths(ckpt_dir, stage)[1]
    if not json_path.is_file():
        return None
    return int(json.loads(json_path.read_text(encoding="utf-8"))["step"])


# ----------------------------------------------------------------------------- losses


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - per-image soft Dice (smoothed by 1 pixel), averaged; BCE alone under-weights small lesions."""
    p, t = torch.sigmoid(logits).flatten(1), target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def coarse_target(masks: torch.Tensor, size: int) -> torch.Tensor:
    """What scales 1..k can show: the mask averaged over an s_k x s_k grid, smoothly upsampled."""
    coarse = F.interpolate(masks, size=(size, size), mode="area")
    return F.interpolate(coarse, size=masks.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)


def mask_loss(
    model: MaskTokenizer, masks: torch.Tensor, coarse_weight: float = 0.5
) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE + soft Dice + VQ loss; for a multi-scale tokenizer also a coarse-preview term.

    The decoder otherwise only ever sees the full residual sum, and renders the partial sums the UI
    streams (scales 1..k) as near-empty masks. The extra term decodes one random partial sum against the
    mask blurred to that scale's grid (the decoder alone learns from it; the latents are detached).
    """
    out = model(masks)
    loss, logs = reconstruction_loss(model, out.logits, out.partial_sums, masks, coarse_weight)
    logs["vq"] = out.vq_loss.item()
    return loss + out.vq_loss, logs


def decoder_only_loss(
    model: MaskTokenizer, masks: torch.Tensor, coarse_weight: float = 0.5
) -> tuple[torch.Tensor, dict[str, float]]:
    """`mask_loss` with the encoder and codebook frozen: the codes of every mask stay what they were."""
    with torch.no_grad():
        q = model.quantizer(model.encoder(model._prepare(masks)))
    return reconstruction_loss(model, model.decoder(q.f_hat), q.partial_sums, masks, coarse_weight)


def reconstruction_loss(
    model: MaskTokenizer,
    logits: torch.Tensor,
    partial_sums: list[torch.Tensor],
    masks: torch.Tensor,
    coarse_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    dice = soft_dice_loss(logits, masks)
    loss = bce + dice
    logs = {"bce": bce.item(), "dice": dice.item()}
    if len(model.scales) > 1 and coarse_weight > 0:
        k = int(torch.randint(len(model.scales) - 1, ()))
        partial = model.decoder(partial_sums[k])
        coarse = F.binary_cross_entropy_with_logits(partial, coarse_target(masks, model.scales[k]))
        loss = loss + coarse_weight * coarse
        logs["coarse"] = coarse.item()
    return loss, logs


def refiner_loss(model: PatchMaskTokenizer, masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE + soft Dice of the refined mosaic against the mask, codes frozen.

    Half the batches use the finest scale (the mask the user gets); the rest a random coarser one, so the
    coarse-to-fine previews are refined too. Targets are the mask area-resized to the mosaic.
    """
    scales = model.scales
    coarse = len(scales) > 1 and bool(torch.rand(()) < 0.5)
    scale = scales[int(torch.randint(len(scales) - 1, ()))] if coarse else scales[-1]
    with torch.no_grad():
        mosaic = model.paste(model.nearest(model.patches(masks, scale)), scale)
        target = F.interpolate(masks, size=mosaic.shape[-2:], mode="area")
    logits = model.refiner(mosaic)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = soft_dice_loss(logits, target)
    return bce + dice, {"bce": bce.item(), "dice": dice.item(), "scale": float(scale)}


def image_loss(model: ImageTokenizer, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    rec = model(images).reconstruction
    l1, mse = F.l1_loss(rec, images), F.mse_loss(rec, images)
    return l1 + mse, {"l1": l1.item(), "psnr": -10 * math.log10(max(mse.item(), 1e-10))}


# ----------------------------------------------------------------------------- training


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 % of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch(data: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random batch, half of it flipped left-right (the decoder training flips too)."""
    index = torch.randint(len(data), (batch_size,), generator=generator)
    batch = data[index].float()
    flip = torch.rand(batch_size, generator=generator) < 0.5
    batch[flip] = batch[flip].flip(-1)
    return batch


def train_stage(
    stage: str,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    data: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 100,
    seed: int = 0,
    progress: bool = True,
    trainable: nn.Module | None = None,
) -> nn.Module:
    """Train one tokenizer with AdamW; checkpoint every `checkpoint_every` steps and at the end.

    With `trainable` (a submodule), only its parameters move and the rest of `model` stays in eval mode.
    """
    torch.manual_seed(seed)
    trainable = model if trainable is None else trainable
    opt = torch.optim.AdamW(trainable.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    start = 0
    if resume and ckpt_dir is not None and checkpoint_step(ckpt_dir, stage) is not None:
        start = load_checkpoint(ckpt_dir, stage, model, opt, generator)  # resumes exactly where it stopped
    model.eval()
    trainable.train()
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, disable=not progress, mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        loss, logs = loss_fn(model, _batch(data, batch_size, generator))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        opt.step()
        bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
        done = step + 1
        if ckpt_dir is not None and (done % checkpoint_every == 0 or done == steps):
            save_checkpoint(ckpt_dir, stage, model, opt, done, generator)
    bar.close()
    return model.eval()


def train_tokenizers(
    recipe: TokenizerRecipe,
    train: LViTSplit | Preloaded,
    out_dir: str | Path,
    *,
    steps: int | None = None,
    resume: bool = False,
    stages: tuple[str, ...] = STAGES,
    progress: bool = True,
) -> Tokenizers:
    """Train every tokenizer on the training split and write them into the model directory `out_dir`.

    With a subset of `stages`, the others are taken from `out_dir`'s checkpoints (they must exist).
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if steps is not None:
        recipe = recipe.with_steps(steps)
    data = train if isinstance(train, Preloaded) else preload(train, recipe.image_size, progress=progress)
    text = TextTokenizer.train(data.descriptions, recipe.text.vocab_size, recipe.text.max_length)
    masks = {}
    for order in ("raster", "scale"):
        config = recipe.mask_config(order)
        if isinstance(config, PatchMaskTokenizerConfig):  # k-means: seconds to minutes, no checkpoints needed
            masks[order] = fit_codebook(PatchMaskTokenizer(config), data.masks, seed=recipe.seed).eval()
            if masks[order].refiner is not None:
                steps_ = recipe.mask.refiner_steps
                _train_refiner(order, masks[order], data.masks, recipe, steps_, ckpt_dir, resume, progress)
            continue
        model = MaskTokenizer(config)
        masks[order] = _run_or_restore(order, model, mask_loss, data.masks, recipe, ckpt_dir, resume, stages, progress)
    model = ImageTokenizer(recipe.image_config())
    image = _run_or_restore("image", model, image_loss, data.images, recipe, ckpt_dir, resume, stages, progress)
    save_tokenizers(out_dir, image, masks, text)
    return load_tokenizers(out_dir)


def refine_mask_decoders(
    out_dir: str | Path,
    train: Preloaded,
    recipe: TokenizerRecipe,
    *,
    steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Tokenizers:
    """Fine-tune only the decoders of `out_dir`'s mask tokenizers (`steps`, default 1,000 / refiner_steps).

    Encoders and codebooks stay frozen, so every mask keeps its codes and a decoder LM trained on those
    codes stays valid; only codes -> mask gets sharper (and the coarse previews clearer). This is how a
    tokenizer set is improved after the expensive LM training has started. A VQ decoder is tuned at a
    quarter of the recipe's rate; a patch codebook gets a `BorderRefiner` (refiner_channels) trained.
    """
    out_dir = Path(out_dir)
    tokenizers = load_tokenizers(out_dir)
    for order, tokenizer in tokenizers.masks.items():
        if isinstance(tokenizer, PatchMaskTokenizer):
            tokenizers.masks[order] = _with_refiner(tokenizer, recipe.mask.refiner_channels)
            refiner_steps = steps or recipe.mask.refiner_steps
            ckpt = out_dir / "checkpoints"
            _train_refiner(order, tokenizers.masks[order], train.masks, recipe, refiner_steps, ckpt, resume, progress)
            continue
        train_stage(
            f"refine-{order}",
            tokenizer,
            decoder_only_loss,
            train.masks,
            steps=steps or 1000,
            batch_size=recipe.mask.batch_size,
            lr=recipe.mask.lr / 4,
            ckpt_dir=out_dir / "checkpoints",
            resume=resume,
            checkpoint_every=recipe.checkpoint_every,
            seed=recipe.seed + 10 + STAGES.index(order),
            progress=progress,
            trainable=tokenizer.decoder,
        )
    save_tokenizers(out_dir, tokenizers.image, tokenizers.masks, tokenizers.text)
    return load_tokenizers(out_dir)


def _with_refiner(tokenizer: PatchMaskTokenizer, channels: int) -> PatchMaskTokenizer:
    """The same codebook with a (fresh) BorderRefiner of `channels`, unless it already has one."""
    if tokenizer.refiner is not None:
        return tokenizer
    if channels <= 0:
        raise ConfigError("--refine-decoders on a patch tokenizer needs mask_tokenizer.refiner_channels > 0")
    refined = PatchMaskTokenizer(replace(tokenizer.config, refiner_channels=channels))
    refined.codebook.copy_(tokenizer.codebook)
    return refined


def _train_refiner(
    order: str,
    tokenizer: PatchMaskTokenizer,
    masks: torch.Tensor,
    recipe: TokenizerRecipe,
    steps: int,
    ckpt_dir: Path,
    resume: bool,
    progress: bool,
) -> None:
    train_stage(
        f"refine-{order}",
        tokenizer,
        refiner_loss,
        masks,
        steps=steps,
        batch_size=recipe.mask.batch_size,
        lr=recipe.mask.lr,
        ckpt_dir=ckpt_dir,
        resume=resume,
        checkpoint_every=recipe.checkpoint_every,
        seed=recipe.seed + 20 + STAGES.index(order),
        progress=progress,
        trainable=tokenizer.refiner,
    )


def _run_or_restore(
    stage: str,
    model: nn.Module,
    loss_fn: Callable,
    data: torch.Tensor,
    recipe: TokenizerRecipe,
    ckpt_dir: Path,
    resume: bool,
    stages: tuple[str, ...],
    progress: bool,
) -> nn.Module:
    """Train `stage` if it is in `stages`, else restore it from its finished checkpoint."""
    steps = recipe.stage_steps(stage)
    if stage not in stages:
        if checkpoint_step(ckpt_dir, stage) is None:
            raise ModelDirectoryError(f"stage '{stage}' was not asked for and {ckpt_dir} has no checkpoint of it")
        opt = torch.optim.AdamW(model.parameters())
        load_checkpoint(ckpt_dir, stage, model, opt)
        return model.eval()
    batch = recipe.image.batch_size if stage == "image" else recipe.mask.batch_size
    lr = recipe.image.lr if stage == "image" else recipe.mask.lr
    return train_stage(
        stage,
        model,
        loss_fn,
        data,
        steps=steps,
        batch_size=batch,
        lr=lr,
        ckpt_dir=ckpt_dir,
        resume=resume,
        checkpoint_every=recipe.checkpoint_every,
        seed=recipe.seed + STAGES.index(stage),
        progress=progress,
    )


# ----------------------------------------------------------------------------- evaluation


def dice_per_image(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dice of each (H, W) pair in (N, H, W) boolean stacks; 1.0 when both are empty."""
    pred, target = pred.reshape(len(pred), -1), target.reshape(len(target), -1)
    inter = (pred & target).sum(1)
    total = pred.sum(1) + target.sum(1)
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def _native_batches(data: Preloaded, batch_size: int):
    """Index batches whose native masks share one shape (decode once per batch at that size)."""
    start = 0
    while start < len(data.masks_native):
        shape = data.masks_native[start].shape
        stop = start
        while stop < len(data.masks_native) and stop - start < batch_size and data.masks_native[stop].shape == shape:
            stop += 1
        yield start, stop, shape
        start = stop


@torch.no_grad()
def evaluate_tokenizers(tokenizers: Tokenizers, data: Preloaded, batch_size: int = 32) -> dict[str, Any]:
    """Mask Dice at native resolution (per-image mean), the scale tokenizer's coarse-to-fine curve,
    codebook usage, and image PSNR / SSIM at model resolution."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    results: dict[str, Any] = {"n_images": len(data.names)}
    for order, tok in tokenizers.masks.items():
        curve = [[] for _ in tok.scales]
        used: set[int] = set()
        for start, stop, shape in _native_batches(data, batch_size):
            codes = tok.encode(data.masks[start:stop].float())
            used.update(torch.cat([c.flatten() for c in codes]).tolist())
            target = np.stack(data.masks_native[start:stop])
            for k in range(len(tok.scales)) if order == "scale" else [len(tok.scales) - 1]:
                prob = tok.decode(codes[: k + 1], out_size=shape)[:, 0].numpy()
                curve[k].append(dice_per_image(prob >= 0.5, target))
        dice = np.concatenate(curve[-1])
        results[order] = {
            "scales": list(tok.scales),
            "tokens": sum(s * s for s in tok.scales),
            "dice_mean": float(dice.mean()),
            "dice_median": float(np.median(dice)),
            "dice_p05": float(np.percentile(dice, 5)),
            "codes_used": len(used),
            "codebook_size": tok.codebook_size,
        }
        if order == "scale":
            results[order]["dice_after_scales"] = [float(np.concatenate(c).mean()) for c in curve]
    psnr, ssim, used = [], [], set()
    image_tok = tokenizers.image
    for start in range(0, len(data.names), batch_size):
        images = data.images[start : start + batch_size].float()
        codes = image_tok.encode(images)
        used.update(codes.flatten().tolist())
        rec = image_tok.decode(codes)[:, 0].numpy().astype(np.float64)
        for truth, out in zip(images[:, 0].numpy().astype(np.float64), rec, strict=True):
            psnr.append(peak_signal_noise_ratio(truth, out, data_range=1.0))
            ssim.append(structural_similarity(truth, out, data_range=1.0))
    results["image"] = {
        "grid": image_tok.grid,
        "psnr_mean": float(np.mean(psnr)),
        "ssim_mean": float(np.mean(ssim)),
        "codes_used": len(used),
        "codebook_size": image_tok.codebook_size,
    }
    return results


def format_results(results: dict[str, Any]) -> str:
    lines = [f"validation images: {results['n_images']}"]
    for order in ("raster", "scale"):
        if order in results:
            r = results[order]
            lines.append(
                f"{order} mask tokenizer, scales {r['scales']} ({r['tokens']} tokens): "
                f"Dice mean {r['dice_mean']:.4f}, median {r['dice_median']:.4f}, 5th percentile {r['dice_p05']:.4f}; "
                f"codes used {r['codes_used']}/{r['codebook_size']}"
            )
            if "dice_after_scales" in r:
                curve = ", ".join(f"{s}:{d:.3f}" for s, d in zip(r["scales"], r["dice_after_scales"], strict=True))
                lines.append(f"       Dice after each scale: {curve}")
    r = results["image"]
    lines.append(
        f"image tokenizer, {r['grid']}x{r['grid']} codes: PSNR {r['psnr_mean']:.2f} dB, SSIM {r['ssim_mean']:.4f};"
        f" codes used {r['codes_used']}/{r['codebook_size']}"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figure


@torch.no_grad()
def make_figure(tokenizers: Tokenizers, data: Preloaded, path: str | Path, indices: list[int] | None = None) -> Path:
    """Validation image, its reconstruction, the mask, the raster and scale reconstructions, and the
    coarse-to-fine previews of the scale tokenizer, one row per example."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices = indices if indices is not None else list(range(min(3, len(data.names))))
    scale_tok, raster_tok = tokenizers.masks.get("scale"), tokenizers.masks.get("raster")
    previews = list(scale_tok.scales) if scale_tok is not None else []
    columns = ["image", "image recon.", "mask"]
    columns += ["raster recon."] if raster_tok is not None else []
    columns += [f"scales 1..{s}" if s != previews[-1] else "scale recon." for s in previews]
    fig, axes = plt.subplots(
        len(indices), len(columns), figsize=(1.6 * len(columns), 1.7 * len(indices)), squeeze=False
    )
    for row, i in enumerate(indices):
        image = data.images[i : i + 1].float()
        mask = data.masks[i : i + 1].float()
        panels = [image[0, 0], tokenizers.image.decode(tokenizers.image.encode(image))[0, 0], mask[0, 0]]
        if raster_tok is not None:
            panels.append((raster_tok.decode(raster_tok.encode(mask))[0, 0] >= 0.5).float())
        if scale_tok is not None:
            codes = scale_tok.encode(mask)
            panels += [scale_tok.decode(codes[: k + 1])[0, 0] for k in range(len(previews))]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. training/configs/default.yaml")
    parser.add_argument("--data", required=True, help="LViT dataset root (with Train_Folder and Val_Folder)")
    parser.add_argument("--out", required=True, help="model directory to write the tokenizers into")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints")
    parser.add_argument("--eval", action="store_true", help="only evaluate the tokenizers in --out on Val_Folder")
    parser.add_argument(
        "--refine-decoders",
        action="store_true",
        help="fine-tune only the mask decoders of --out for --steps steps (codes unchanged: a trained LM stays valid)",
    )
    parser.add_argument("--steps", type=int, default=None, help="override the steps of every stage")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pairs of a split")
    parser.add_argument("--figure", default=None, help="with --eval: also write the reconstruction figure here")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    recipe = load_tokenizer_recipe(args.config)
    out = Path(args.out)
    if args.eval:
        tokenizers = load_tokenizers(out)
        t0 = time.perf_counter()
        val = preload(load_split(args.data, split="val"), recipe.image_size, args.limit)
        results = evaluate_tokenizers(tokenizers, val)
        results["seconds"] = round(time.perf_counter() - t0, 1)
        print(format_results(results))
        write_text_atomic(out / EVAL_FILE, json.dumps(results, indent=2) + "\n")
        print(f"wrote {out / EVAL_FILE}")
        if args.figure:
            print(f"wrote {make_figure(tokenizers, val, args.figure)}")
        return 0
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"unknown stages {unknown}; choose from {list(STAGES)}")
    t0 = time.perf_counter()
    train = preload(load_split(args.data, split="train"), recipe.image_size, args.limit)
    print(f"read {len(train.names)} training pairs in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.refine_decoders:
        refine_mask_decoders(out, train, recipe, steps=args.steps, resume=args.resume)
    else:
        train_tokenizers(recipe, train, out, steps=args.steps, resume=args.resume, stages=stages)
    print(f"wrote tokenizers to {out} in {time.perf_counter() - t0:.0f} s")
    return 0
