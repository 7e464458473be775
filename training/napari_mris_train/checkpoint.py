"""Full training state on disk, so that `--resume` continues exactly where a run stopped.

A checkpoint is a folder `checkpoints/last/` with `state.safetensors` (model, optimizer moments, HET
memory, torch RNG) and `state.json` (step, best Dice, optimizer hyper-parameters, Python and NumPy RNG).
It is written to a temporary folder and renamed over the old one, so a crash mid-write leaves the
previous checkpoint intact. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from napari_mris.errors import MRISError

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


class CheckpointError(MRISError):
    """A training checkpoint is missing, damaged, or from a different recipe."""


# --- optimizer --------------------------------------------------------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AdamW state as flat tensors `optim.<param index>.<name>`, plus the param groups as JSON."""
    state = optimizer.state_dict()
    tensors = {
        f"optim.{index}.{name}": value if torch.is_tensor(value) else torch.tensor(value)
        for index, values in state["state"].items()
        for name, value in values.items()
    }
    return tensors, state["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Inverse of `optimizer_tensors`; `tensors` are keyed `<param index>.<name>` (prefix removed)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- random number generators -----------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# --- the checkpoint folder --------------------------------------------------------------------------------


def save_checkpoint(
    folder: Path,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    het_state: dict[str, torch.Tensor] | None,
    info: dict[str, Any],
) -> None:
    """Write the whole training state to `folder` atomically (temp folder, then rename)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    optim, groups = optimizer_tensors(optimizer)
    tensors.update({k: v.detach().cpu().contiguous() for k, v in optim.items()})
    if het_state is not None:
        tensors.update({f"het.{k}": v for k, v in het_state.items()})
    rng_tensors, rng_meta = rng_state()
    tensors.update(rng_tensors)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(tensors, str(staging / STATE_TENSORS))
        meta = {**info, "param_groups": groups, "rng": rng_meta}
        (staging / STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, info) of a checkpoint folder; the caller hands each part to its owner."""
    missing = [name for name in (STATE_TENSORS, STATE_JSON) if not (folder / name).is_file()]
    if missing:  # named here: safetensors' own FileNotFoundError carries no file name
        raise CheckpointError(f"no training checkpoint in {folder} ({' and '.join(missing)} missing)")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
        info = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"the training checkpoint in {folder} is damaged: {exc}") from exc
    return tensors, info


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix.`, with the prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
