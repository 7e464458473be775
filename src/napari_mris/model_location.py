"""Where the model is: the default model directory, a user's choice of directory, and their checks.

One torch-free owner, because the dock widget (which must not import torch before the first Segment), the
pipeline and the CLI all turn a `--model` value or a chosen folder into a directory, and must agree on what
"default" means and on the message for a wrong one:

- `"default"` is `$NAPARI_MRIS_MODEL` when that variable is set (a site's own model on a shared
  workstation, without a `--model` on every call), else the model shipped in the package (`models/default`);
- anything else is a directory path (`~` expanded).

`resolve_model_dir` is the check a load starts with (a `ModelDirectoryError` naming the folder);
`model_problem` is the same check plus config.json's presence and format version, as a message for the
widget to show when a folder is chosen, before anything is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from napari_mris.errors import ModelDirectoryError

DEFAULT = "default"
DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"
ENV_MODEL = "NAPARI_MRIS_MODEL"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1  # of config.json; model/modeldir.py refuses any other on load


def model_path(model: str | Path) -> Path:
    """The directory `model` names, unchecked ('default': `$NAPARI_MRIS_MODEL`, else the packaged model)."""
    if str(model) == DEFAULT:
        override = os.environ.get(ENV_MODEL)
        return Path(override).expanduser() if override else DEFAULT_MODEL_DIR
    return Path(model).expanduser()


def resolve_model_dir(model: str | Path) -> Path:
    """The directory `model` names, which must exist; the packaged default must also hold its config.json
    (a source checkout without the model's files is the usual way to miss it)."""
    path = model_path(model)
    if str(model) == DEFAULT and os.environ.get(ENV_MODEL):
        if not path.is_dir():
            raise ModelDirectoryError(f"${ENV_MODEL} names {path}, which is not a directory; unset it or fix the path")
        return path
    if str(model) == DEFAULT and not (path / CONFIG_NAME).is_file():
        raise ModelDirectoryError(
            f"The default model is not installed ({path} has no {CONFIG_NAME}); "
            "choose a model directory (napari-mris --model DIR, or the widget's model button)"
        )
    if not path.is_dir():
        raise ModelDirectoryError(f"Model directory not found: {path}")
    return path


def check_format_version(config: dict[str, Any], path: Path) -> None:
    """Refuse a config.json written by a napari-mris with another directory format."""
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelDirectoryError(
            f"{path} has format_version {version!r}; this napari-mris reads version {FORMAT_VERSION}"
        )


def model_problem(model: str | Path) -> str | None:
    """Why `model` cannot be a model directory (missing, no or unreadable config.json, another format), or
    None. Reads config.json only: damaged weights are found when the model loads."""
    try:
        path = resolve_model_dir(model) / CONFIG_NAME
        if not path.is_file():
            return f"{path.parent} is not a napari-mris model directory: it has no {CONFIG_NAME}"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{path} cannot be read as JSON: {exc}"
        if not isinstance(config, dict):
            return f"{path} does not hold a JSON object"
        check_format_version(config, path)
    except ModelDirectoryError as exc:
        return str(exc)
    return None


def peek_config(model: str | Path) -> dict[str, Any]:
    """config.json of `model` for display (default order, ...), read without torch; {} when it is missing or
    unreadable, which loading the model reports in full."""
    try:
        config = json.loads((model_path(model) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
