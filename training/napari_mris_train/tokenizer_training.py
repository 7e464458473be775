"""`napari-mris-train tokenizers`: train (or `--eval`) the image, mask and text tokenizers.

Four stages: the BPE text tokenizer (seconds), the raster (single-scale) and the coarse-to-fine (pyramid)
patch mask tokenizers (a k-means codebook, then an optional BorderRefiner), and the FSQ image tokenizer.
Training uses the Train_Folder only; `--eval` measures on Val_Folder at the masks' own resolution. The split
is read into memory once (5,716 QaTa pairs at 224x224 are ~0.4 GB as float16) so steps cost only the networks.

The parts of the decoder trainer's toolkit are shared, not copied: checkpoints are `checkpoint.py` folders
(`<out>/checkpoints/<stage>/`, safetensors + JSON, no pickle), the learning rate is `schedule.learning_rate`,
Dice is `metrics.dice_iou`, and the refiner's BCE + soft Dice is `losses.lesion_loss`.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from napari_mris.errors import ModelDirectoryError
from napari_mris.io.atomic import write_text_atomic
from napari_mris.model.modeldir import load_state_checked
from napari_mris.tokenizers import ORDERS, Tokenizers, load_tokenizers, save_tokenizers
from napari_mris.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from napari_mris.tokenizers.patch import PatchMaskTokenizer, PatchMaskTokenizerConfig, fit_codebook
from napari_mris.tokenizers.preprocess import to_model_image
from napari_mris.tokenizers.text import TextTokenizer
from napari_mris_train import checkpoint
from napari_mris_train.config import ConfigError, load_recipe
from napari_mris_train.data import LViTSplit, load_split
from napari_mris_train.losses import lesion_loss
from napari_mris_train.metrics import dice_iou
from napari_mris_train.schedule import learning_rate

STAGES = ("text", *ORDERS, "image")
EVAL_FILE = "tokenizer_eval.json"
MIN_LR_FRACTION = 0.1  # the cosine ends at 10 % of the peak
WARMUP_FRACTION = 0.05  # linear warm-up over the first 5 % of the steps


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
    """The patch mask tokenizers (patch.py) of both decoding orders; the refiner is their only SGD part."""

    raster_scales: tuple[int, ...] = (14,)
    scale_scales: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 10, 14)
    codebook_size: int = 4096
    refiner_channels: int = 0  # width of the BorderRefiner (0 = none), trained with the codes frozen
    refiner_steps: int = 600
    batch_size: int = 16  # refiner batches
    lr: float = 1e-3  # refiner peak learning rate


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

    def mask_config(self, order: str) -> PatchMaskTokenizerConfig:
        r = self.mask
        scales = r.raster_scales if order == "raster" else r.scale_scales
        return PatchMaskTokenizerConfig(self.image_size, scales, r.codebook_size, r.refiner_channels)

    def with_steps(self, steps: int) -> TokenizerRecipe:
        """The same recipe with every trained stage's step count (image, refiners) set to `steps` (`--steps`)."""
        return replace(self, image=replace(self.image, steps=steps), mask=replace(self.mask, refiner_steps=steps))


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


# ----------------------------------------------------------------------------- losses


def refiner_loss(model: PatchMaskTokenizer, masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE + soft Dice (`losses.lesion_loss`) of the refined mosaic against the mask, codes frozen.

    Half the batches use the finest scale (the mask the user gets); the rest a random coarser one, so the
    coarse-to-fine previews are refined too. The target is the mask area-pooled to the mosaic's size.
    """
    scales = model.scales
    coarse = len(scales) > 1 and bool(torch.rand(()) < 0.5)
    scale = scales[int(torch.randint(len(scales) - 1, ()))] if coarse else scales[-1]
    with torch.no_grad():
        mosaic = model.paste(model.nearest(model.patches(masks, scale)), scale)
    loss = lesion_loss(model.refiner(mosaic), masks)
    return loss, {"loss": loss.item(), "scale": float(scale)}


def image_loss(model: ImageTokenizer, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    rec = model(images).reconstruction
    l1, mse = F.l1_loss(rec, images), F.mse_loss(rec, images)
    return l1 + mse, {"l1": l1.item(), "psnr": -10 * math.log10(max(mse.item(), 1e-10))}


# ----------------------------------------------------------------------------- training


def _batch(data: torch.Tensor, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Step `step`'s random batch, half of it flipped left-right (the decoder training flips too).

    Drawn from a generator seeded by (seed, step), so a resumed run draws the same batches without the
    generator's state in the checkpoint.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    index = torch.randint(len(data), (batch_size,), generator=generator)
    batch = data[index].float()
    flip = torch.rand(batch_size, generator=generator) < 0.5
    batch[flip] = batch[flip].flip(-1)
    return batch


def _resume(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Restore `model`, `opt` and the RNGs from a checkpoint folder; returns the step it reached."""
    tensors, info = checkpoint.load_checkpoint(folder)
    load_state_checked(model, checkpoint.part(tensors, "model"), folder / checkpoint.STATE_TENSORS)
    try:
        checkpoint.load_optimizer(opt, checkpoint.part(tensors, "optim"), info["param_groups"])
    except (ValueError, KeyError) as exc:
        raise checkpoint.CheckpointError(f"{folder}: optimizer state does not match this recipe: {exc}") from exc
    checkpoint.restore_rng(tensors, info["rng"])
    return int(info["step"])


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
    """Train one tokenizer with AdamW; checkpoint to `ckpt_dir/<stage>/` every `checkpoint_every` steps
    and at the end. With `trainable` (a submodule), only its parameters move and the rest of `model` stays
    in eval mode."""
    torch.manual_seed(seed)
    trainable = model if trainable is None else trainable
    opt = torch.optim.AdamW(trainable.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    folder = None if ckpt_dir is None else Path(ckpt_dir) / stage
    start = 0
    if resume and folder is not None and (folder / checkpoint.STATE_JSON).is_file():
        start = _resume(folder, model, opt)  # resumes exactly where it stopped
    model.eval()
    trainable.train()
    warmup = max(1, int(steps * WARMUP_FRACTION))
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, disable=not progress, mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr, lr * MIN_LR_FRACTION, warmup)
        loss, logs = loss_fn(model, _batch(data, batch_size, seed, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        opt.step()
        bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
        done = step + 1
        if folder is not None and (done % checkpoint_every == 0 or done == steps):
            checkpoint.save_checkpoint(folder, model.state_dict(), opt, None, {"stage": stage, "step": done})
    bar.close()
    return model.eval()


def check_stages(stages: tuple[str, ...]) -> None:
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"unknown stages {unknown}; choose from {list(STAGES)}")


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
    """Train the tokenizers of `stages` on the training split and write them into the model directory
    `out_dir`; the stages left out keep the tokenizers `out_dir` already holds (it must hold them)."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    check_stages(stages)
    kept = None if set(stages) == set(STAGES) else load_tokenizers(out_dir)
    if steps is not None:
        recipe = recipe.with_steps(steps)
    data = train if isinstance(train, Preloaded) else preload(train, recipe.image_size, progress=progress)
    if "text" in stages:
        text = TextTokenizer.train(data.descriptions, recipe.text.vocab_size, recipe.text.max_length)
    else:
        text = kept.text
    saving = dict(ckpt_dir=ckpt_dir, resume=resume, checkpoint_every=recipe.checkpoint_every, progress=progress)
    masks = {}
    for order in ORDERS:
        if order not in stages:
            if order not in kept.masks:
                raise ModelDirectoryError(f"{out_dir} has no '{order}' mask tokenizer to keep: add it to the stages")
            masks[order] = kept.masks[order]
            continue
        masks[order] = fit_codebook(PatchMaskTokenizer(recipe.mask_config(order)), data.masks, seed=recipe.seed)
        if masks[order].refiner is not None:
            _train_refiner(order, masks[order], data.masks, recipe, recipe.mask.refiner_steps, saving)
        masks[order].eval()
    if "image" in stages:
        image = ImageTokenizer(recipe.image_config())
        r, seed = recipe.image, recipe.seed + STAGES.index("image")
        schedule = dict(steps=r.steps, batch_size=r.batch_size, lr=r.lr, seed=seed)
        train_stage("image", image, image_loss, data.images, **schedule, **saving)
    else:
        image = kept.image
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
    """Train a `BorderRefiner` (refiner_channels) on each of `out_dir`'s mask tokenizers, `steps` steps
    (default refiner_steps).

    The codebooks stay frozen, so every mask keeps its codes and a decoder LM trained on those codes stays
    valid; only codes -> mask gets sharper (and the coarse previews clearer). This is how a tokenizer set is
    improved after the expensive LM training has started.
    """
    out_dir = Path(out_dir)
    tokenizers = load_tokenizers(out_dir)
    saving = dict(
        ckpt_dir=out_dir / "checkpoints", resume=resume, checkpoint_every=recipe.checkpoint_every, progress=progress
    )
    for order, tokenizer in tokenizers.masks.items():
        tokenizers.masks[order] = _with_refiner(tokenizer, recipe.mask.refiner_channels)
        _train_refiner(order, tokenizers.masks[order], train.masks, recipe, steps or recipe.mask.refiner_steps, saving)
    save_tokenizers(out_dir, tokenizers.image, tokenizers.masks, tokenizers.text)
    return load_tokenizers(out_dir)


def _with_refiner(tokenizer: PatchMaskTokenizer, channels: int) -> PatchMaskTokenizer:
    """The same codebook with a (fresh) BorderRefiner of `channels`, unless it already has one."""
    if tokenizer.refiner is not None:
        return tokenizer
    if channels <= 0:
        raise ConfigError("--refine-decoders needs mask_tokenizer.refiner_channels > 0")
    refined = PatchMaskTokenizer(replace(tokenizer.config, refiner_channels=channels))
    refined.codebook.copy_(tokenizer.codebook)
    return refined


def _train_refiner(
    order: str, tokenizer: PatchMaskTokenizer, masks: torch.Tensor, recipe: TokenizerRecipe, steps: int, saving: dict
) -> None:
    """Train `tokenizer`'s BorderRefiner only (stage `refine-<order>`); `saving` = train_stage's checkpointing."""
    r, seed = recipe.mask, recipe.seed + 20 + STAGES.index(order)
    schedule = dict(steps=steps, batch_size=r.batch_size, lr=r.lr, seed=seed)
    train_stage(f"refine-{order}", tokenizer, refiner_loss, masks, **schedule, **saving, trainable=tokenizer.refiner)


# ----------------------------------------------------------------------------- evaluation


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
                curve[k].append([dice_iou(p, t)[0] for p, t in zip(prob >= 0.5, target, strict=True)])
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
        help="train a BorderRefiner on --out's mask tokenizers (codes unchanged: a trained LM stays valid)",
    )
    parser.add_argument("--steps", type=int, default=None, help="override the steps of the image and refiner stages")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)}; the others are kept from --out",
    )
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
    check_stages(stages)  # before the split is read
    t0 = time.perf_counter()
    train = preload(load_split(args.data, split="train"), recipe.image_size, args.limit)
    print(f"read {len(train.names)} training pairs in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.refine_decoders:
        refine_mask_decoders(out, train, recipe, steps=args.steps, resume=args.resume)
    else:
        train_tokenizers(recipe, train, out, steps=args.steps, resume=args.resume, stages=stages)
    print(f"wrote tokenizers to {out} in {time.perf_counter() - t0:.0f} s")
    return 0
