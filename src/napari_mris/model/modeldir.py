"""A model directory on disk: `config.json` plus safetensors weight files.

Every stage (tokenizer training, decoder training, fine-tuning) adds its part to the same directory,
so reading and updating `config.json` and the weight files goes through these few functions. A missing
or mismatched file raises `ModelDirectoryError` naming that file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from napari_mris.errors import ModelDirectoryError
from napari_mris.io.atomic import atomic_path, write_text_atomic

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"


def require_file(model_dir: str | Path, name: str) -> Path:
    """Return `model_dir/name`, or fail with a message naming the missing file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirectoryError(f"Model directory not found: {model_dir}")
    path = model_dir / name
    if not path.is_file():
        raise ModelDirectoryError(f"Model directory {model_dir} is incomplete: {name} is missing")
    return path


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """Read `config.json`, checking it parses and has a format version this code understands."""
    path = require_file(model_dir, CONFIG_NAME)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirectoryError(f"{path} is not valid JSON: {exc}") from exc
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelDirectoryError(
            f"{path} has format_version {version!r}; this napari-mris reads version {FORMAT_VERSION}"
        )
    return config


def write_config(model_dir: str | Path, config: dict[str, Any]) -> None:
    config = {"format_version": FORMAT_VERSION, **config}
    write_text_atomic(Path(model_dir) / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def update_config(model_dir: str | Path, **sections: Any) -> dict[str, Any]:
    """Set top-level sections of `config.json` (creating the file if needed) and return the result."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config = read_config(model_dir) if (model_dir / CONFIG_NAME).exists() else {}
    config.update(sections)
    write_config(model_dir, config)
    return read_config(model_dir)


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically (never pickle)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(model_dir: str | Path, name: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file of the model directory, with a clear error if it is missing or corrupt."""
    path = require_file(model_dir, name)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelDirectoryError(f"{path} is not a readable safetensors file: {exc}") from exc


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load a state dict, turning key or shape mismatches into a message naming the file."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ModelDirectoryError(f"{source} does not match config.json: {exc}") from exc
    if missing or unexpected:
        raise ModelDirectoryError(
            f"{source} does not match config.json: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_hash(model_dir: str | Path) -> str:
    """A short id of the exact weights: sha256 over config.json and model.safetensors."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, "model.safetensors"):
        digest.update(file_sha256(require_file(model_dir, name)).encode())
    return digest.hexdigest()[:16]
