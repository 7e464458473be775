"""The peer baseline: a text-free U-Net trained for a fixed wall-clock budget on the same split.

The default MRIS model must beat this on QaTa-COV19 Val_Folder Dice when both get the same CPU time on
the same machine. The U-Net is the plain Ronneberger et al. design (two 3x3 convs per level, max-pool
down, transposed-conv up, skip connections), small enough to train on a CPU; it is written out here
rather than taken from MONAI to avoid a large dependency for one benchmark. Its predictions are scored
with the same metric code as `napari-mris-train eval`.

    python benchmarks/unet_baseline.py --data ../shared/data/QaTa-COV19 --minutes 60 --out runs/unet

Two recipes are reported against the default model (docs/results.md): this script's defaults (five levels,
224 px, batch 8) and the stronger one issue 15 measured on held-out cases (`--widths 16 32 64 128 --size 128
--batch-size 16`). `--clock cpu` counts the process's CPU time instead of wall time, so a run on a shared
machine (or one paused and continued) still gets the whole budget of compute. The training state is saved
to `OUT/checkpoint` every `--checkpoint-minutes` of the budget and at its end (napari_mris_train.checkpoint:
safetensors and JSON, written atomically); `--resume` continues from it with the budget left.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from napari_mris_train.checkpoint import (
    STATE_JSON,
    CheckpointError,
    load_checkpoint,
    load_optimizer,
    part,
    restore_rng,
    save_checkpoint,
)
from napari_mris_train.data import load_split
from napari_mris_train.metrics import dice_iou, overlap_counts, pooled_dice_iou


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128, 256)) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        c_in = 1
        for width in widths:
            self.down.append(conv_block(c_in, width))
            c_in = width
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c_in, width, 2, stride=2))
            self.merge.append(conv_block(2 * width, width))
            c_in = width
        self.head = nn.Conv2d(c_in, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def load_arrays(split, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole split into memory as float tensors resized to `size` (QaTa is 224 px already)."""
    images, masks = [], []
    for i in tqdm(range(len(split)), desc="loading", leave=False):
        example = split[i]
        images.append(torch.from_numpy(example.image.astype(np.float32) / 255.0))
        masks.append(torch.from_numpy(example.mask.astype(np.float32)))
    x = torch.stack(images)[:, None]
    y = torch.stack(masks)[:, None]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
        y = (F.interpolate(y, size=(size, size), mode="area") > 0.5).float()
    return x, y


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    dice = (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()


def train(
    model: UNet,
    x: torch.Tensor,
    y: torch.Tensor,
    minutes: float,
    batch_size: int,
    clock: str = "wall",
    checkpoint: Path | None = None,
    checkpoint_minutes: float = 10.0,
    recipe: dict | None = None,
) -> dict:
    """Train until `minutes` of the budget are spent (`clock`: wall or CPU time); batches are drawn with
    torch's global generator, so a checkpoint (which saves it) resumes the same sequence."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    now = time.process_time if clock == "cpu" else time.monotonic
    steps, spent = 0, 0.0  # spent: seconds of the budget used before this process
    if checkpoint is not None and (checkpoint / STATE_JSON).exists():
        tensors, info = load_checkpoint(checkpoint)
        if info.get("recipe") != recipe:
            raise CheckpointError(f"{checkpoint} is from another recipe: {info.get('recipe')}, not {recipe}")
        model.load_state_dict(part(tensors, "model"))
        load_optimizer(optimizer, part(tensors, "optim"), info["param_groups"])
        restore_rng(tensors, info["rng"])
        steps, spent = info["steps"], info["spent_s"]
        print(f"resumed at step {steps}, {spent / 60:.1f} of {minutes} minutes spent")
    start, saved = now() - spent, spent
    bar = tqdm(desc="unet", unit="step", initial=steps)
    model.train()
    while now() - start < minutes * 60:
        idx = torch.randint(0, len(x), (batch_size,))
        xb, yb = x[idx], y[idx]
        if torch.rand(()) < 0.5:  # flip image and mask together; no text to keep
            xb, yb = xb.flip(-1), yb.flip(-1)
        loss = dice_bce_loss(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if checkpoint is not None and now() - start - saved >= checkpoint_minutes * 60:
            saved = now() - start
            info = {"steps": steps, "spent_s": saved, "recipe": recipe}
            save_checkpoint(checkpoint, model.state_dict(), optimizer, None, info)
    bar.close()
    if checkpoint is not None:  # the final state too: the evaluated model can be read back (stem_readout.py --unet)
        info = {"steps": steps, "spent_s": now() - start, "recipe": recipe}
        save_checkpoint(checkpoint, model.state_dict(), optimizer, None, info)
    return {"steps": steps, "examples_seen": steps * batch_size, "minutes": minutes, "clock": clock}


@torch.no_grad()
def probabilities(model: UNet, x: torch.Tensor, out_size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) lesion probabilities of a batch of inputs, resized bilinearly to the masks' size."""
    model.eval()
    probs = []
    for start in range(0, len(x), 32):
        logits = model(x[start : start + 32])
        probs.append(F.interpolate(torch.sigmoid(logits), size=out_size, mode="bilinear", align_corners=False)[:, 0])
    return torch.cat(probs).numpy()


def predict(model: UNet, x: torch.Tensor, out_size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) masks: the probabilities at 0.5."""
    return probabilities(model, x, out_size) > 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="LViT root (with Train_Folder and Val_Folder)")
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="what --minutes counts")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128, 256], help="channels per level")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-val", type=int, default=None, help="evaluate on the first N val images only")
    parser.add_argument("--out", type=Path, default=Path("runs/unet"))
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0, help="save the state this often")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_split = load_split(args.data, split="train")
    val_split = load_split(args.data, split="val")
    x_train, y_train = load_arrays(train_split, args.size)
    model = UNet(tuple(args.widths))
    recipe = {k: getattr(args, k) for k in ("minutes", "clock", "widths", "size", "batch_size", "seed")}
    checkpoint = args.out / "checkpoint"
    if checkpoint.exists() and not args.resume:
        raise SystemExit(f"{checkpoint} exists: pass --resume to continue that run, or choose another --out")
    run = train(
        model, x_train, y_train, args.minutes, args.batch_size, args.clock, checkpoint, args.checkpoint_minutes, recipe
    )

    n_val = len(val_split) if args.limit_val is None else min(args.limit_val, len(val_split))
    val_examples = [val_split[i] for i in range(n_val)]
    x_val = torch.stack([torch.from_numpy(e.image.astype(np.float32) / 255.0) for e in val_examples])[:, None]
    x_val = F.interpolate(x_val, size=(args.size, args.size), mode="area")
    predictions = predict(model, x_val, out_size=val_examples[0].mask.shape)
    per_image = [dice_iou(pred, e.mask) for pred, e in zip(predictions, val_examples, strict=True)]
    counts = [overlap_counts(pred, e.mask > 0) for pred, e in zip(predictions, val_examples, strict=True)]
    pooled = pooled_dice_iou(counts)
    scores = {
        "dice": float(np.mean([d for d, _ in per_image])),
        "miou": float(np.mean([i for _, i in per_image])),
        "pooled_dice": pooled[0],
        "pooled_miou": pooled[1],
    }

    result = {
        "model": "U-Net (text-free)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_images": n_val,
        "size": args.size,
        "widths": args.widths,
        "batch_size": args.batch_size,
        **run,
        **scores,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unet_baseline.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
