"""A model directory on disk: `config.json` plus safetensors weight files.

Every stage (tokenizer training, decoder training, fine-tuning) adds its part to the same directory,
so reading and updating `config.json` and the weight files goes through these few functions. A missing
or mismatched file raises `ModelDirectoryError` naming that file.

Integrity: a finished model directory carries `SHA256SUMS` (the `sha256sum` format, so `sha256sum -c
SHA256SUMS` checks it too) listing every file a loader may read (`model_files`). Loading verifies each file
against it and refuses a damaged, missing or unlisted one by name; a directory without the manifest (a
training run in progress) loads unverified. The model hash is the sha256 of that listing, so it covers every
file whether or not the manifest was written. Files written through `write_config` / `save_weights` keep an
existing manifest current; anything else written into a finished model needs `write_manifest` again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from napari_mris.errors import ModelDirectoryError
from napari_mris.io.atomic import atomic_path, write_text_atomic
from napari_mris.model_location import CONFIG_NAME, FORMAT_VERSION, check_format_version

MANIFEST_NAME = "SHA256SUMS"
# Not covered by the manifest: documentation and logs (no loader reads them; logs grow while training),
# adapters (each records the hash of its base model), training state (runs, checkpoints, encoding cache),
# and hidden files (the temporary files of atomic writes).
UNHASHED_SUFFIXES = (".md", ".jsonl", ".log")
UNHASHED_DIRS = ("adapters", "runs", "checkpoints", "cache")
MANIFEST_COMMAND = "python -c \"from napari_mris.model.modeldir import write_manifest; write_manifest('DIR')\""
_MANIFEST_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def require_file(model_dir: str | Path, name: str) -> Path:
    """Return `model_dir/name`, or fail with a message naming the missing file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirectoryError(f"Model directory not found: {model_dir}")
    path = model_dir / name
    if not path.is_file():
        raise ModelDirectoryError(f"Model directory {model_dir} is incomplete: {name} is missing")
    return path


def verified_file(model_dir: str | Path, name: str) -> Path:
    """`require_file`, plus the check against the directory's manifest when it has one."""
    path = require_file(model_dir, name)
    manifest = read_manifest(model_dir)
    if manifest is not None:
        _check_entry(Path(model_dir), name, manifest)
    return path


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """Read `config.json`, checking it parses and has a format version this code understands."""
    path = verified_file(model_dir, CONFIG_NAME)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirectoryError(f"{path} is not valid JSON: {exc}") from exc
    check_format_version(config, path)
    return config


def write_config(model_dir: str | Path, config: dict[str, Any]) -> None:
    config = {"format_version": FORMAT_VERSION, **config}
    write_text_atomic(Path(model_dir) / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    _keep_manifest_current(Path(model_dir) / CONFIG_NAME)


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
    _keep_manifest_current(Path(path))


def load_weights(model_dir: str | Path, name: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file of the model directory, with a clear error if it is missing or corrupt."""
    path = verified_file(model_dir, name)
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


def model_files(model_dir: str | Path) -> list[str]:
    """The files the manifest covers, as sorted relative POSIX paths: every regular file of the directory and
    its subfolders except the manifest, `.md`/`.jsonl`/`.log` files, hidden entries and the top-level
    adapters/, runs/, checkpoints/ and cache/ folders (see UNHASHED_*)."""
    root = Path(model_dir)
    names = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (here == root and d in UNHASHED_DIRS)]
        for file in files:
            path = here / file
            if file.startswith(".") or file.lower().endswith(UNHASHED_SUFFIXES) or not path.is_file():
                continue
            if here == root and file == MANIFEST_NAME:
                continue
            names.append(path.relative_to(root).as_posix())
    return sorted(names)


def manifest_text(digests: dict[str, str]) -> str:
    """`sha256sum` lines ("<hex>  <path>"), sorted by path: the manifest file and the input of the model hash."""
    return "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))


def compute_digests(model_dir: str | Path) -> dict[str, str]:
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelDirectoryError(f"Model directory not found: {root}")
    return {name: file_sha256(root / name) for name in model_files(root)}


def write_manifest(model_dir: str | Path) -> Path:
    """Write `SHA256SUMS` for the files as they are now (export, or after replacing weights by hand)."""
    root = Path(model_dir)
    digests = compute_digests(root)
    if CONFIG_NAME not in digests:
        raise ModelDirectoryError(f"Model directory {root} is incomplete: {CONFIG_NAME} is missing")
    write_text_atomic(root / MANIFEST_NAME, manifest_text(digests))
    return root / MANIFEST_NAME


def read_manifest(model_dir: str | Path) -> dict[str, str] | None:
    """{relative path: sha256} from `SHA256SUMS`, or None when the directory has none."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelDirectoryError(f"{path} cannot be read: {exc}") from exc
    digests = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _MANIFEST_LINE.match(line)
        name = match.group(2) if match else ""
        if not match or name.startswith("/") or ".." in Path(name).parts:
            raise ModelDirectoryError(f"{path} line {number} is not '<sha256>  <file in the model directory>'")
        digests[name] = match.group(1)
    return digests


@dataclass(frozen=True)
class ModelCheck:
    """The outcome of `verify_model_dir`: the model hash, and whether a manifest vouched for the files."""

    model_hash: str
    verified: bool
    n_files: int


def verify_model_dir(model_dir: str | Path) -> ModelCheck:
    """Check every file against `SHA256SUMS` (missing, changed or unlisted files are refused by name) and
    return the model hash; without a manifest, the hash of the files as they are, unverified."""
    root = Path(model_dir)
    actual = compute_digests(root)
    manifest = read_manifest(root)
    if manifest is not None:
        for name in sorted(manifest):
            _check_entry(root, name, manifest, actual.get(name))
        unlisted = sorted(set(actual) - set(manifest))
        if unlisted:
            raise ModelDirectoryError(
                f"{root / unlisted[0]} is not listed in {root / MANIFEST_NAME}, so it cannot be verified; if it "
                f"belongs to the model, re-write the manifest: {MANIFEST_COMMAND.replace('DIR', str(root))}"
            )
    return ModelCheck(_hash_of(actual), manifest is not None, len(actual))


def model_hash(model_dir: str | Path) -> str:
    """A short id of the exact model: sha256 of the manifest listing of every file (`model_files`)."""
    return _hash_of(compute_digests(model_dir))


def _hash_of(digests: dict[str, str]) -> str:
    return hashlib.sha256(manifest_text(digests).encode()).hexdigest()[:16]


def _check_entry(root: Path, name: str, manifest: dict[str, str], digest: str | None = None) -> None:
    """Refuse `name` when it is unlisted, missing, or its bytes differ from its manifest entry."""
    path = root / name
    if name not in manifest:
        raise ModelDirectoryError(
            f"{path} is not listed in {root / MANIFEST_NAME}, so it cannot be verified; if it belongs to the "
            f"model, re-write the manifest: {MANIFEST_COMMAND.replace('DIR', str(root))}"
        )
    if not path.is_file():
        raise ModelDirectoryError(f"Model directory {root} is incomplete: {name} (in {MANIFEST_NAME}) is missing")
    if (digest or file_sha256(path)) != manifest[name]:
        raise ModelDirectoryError(
            f"{path} is damaged or was changed: its sha256 differs from {root / MANIFEST_NAME}; restore the file "
            f"(reinstall or copy the model again), or if the change is intended re-write the manifest: "
            f"{MANIFEST_COMMAND.replace('DIR', str(root))}"
        )


def _keep_manifest_current(path: Path) -> None:
    """After a deliberate write through this module, update that file's entry in an existing manifest."""
    root = path.parent
    manifest = read_manifest(root)
    if manifest is None or path.name not in model_files(root):
        return
    manifest[path.name] = file_sha256(path)
    write_text_atomic(root / MANIFEST_NAME, manifest_text(manifest))
