"""LoRA adapters of a base model, stored per user and keyed by the base model's hash.

Why not beside the model: the bundled model lives inside the installed package, which a normal pip install
does not let a user write, and a model directory shared by several users should not collect one user's
corrections. Where: `$NAPARI_MRIS_ADAPTERS` if set, else `adapters/` in the user data folder that
platformdirs names for napari-mris (`~/.local/share/napari-mris` on Linux), then one folder per base
model hash (`modeldir.model_hash`, which covers every model file) and one per adapter:

    <root>/<base model hash, 16 hex>/<adapter name>/adapter_model.safetensors, adapter_config.json, base_model.json
                                                     [evaluation.json: base vs adapter on held-back corrections]
                                                     [calibration.json: the lesion map's cut chosen on the corrections]

The hash key means a model directory only ever sees its own adapters, wherever it is installed; the
`base_model.json` inside each adapter is checked again on load, so a folder copied by hand under another
hash is refused rather than merged into the wrong weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from napari_mris.errors import ModelDirectoryError

ENV_ROOT = "NAPARI_MRIS_ADAPTERS"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
BASE = "base_model.json"
EVALUATION = "evaluation.json"  # napari_mris.adaptation.HeldOutComparison, written with the adapter
CALIBRATION = "calibration.json"  # {"lesion_threshold": t}: the user's border (lesion_snap.py)
HASH_CHARS = 16


def adapters_root() -> Path:
    """The per-user adapters folder: `$NAPARI_MRIS_ADAPTERS`, else platformdirs' user data dir."""
    override = os.environ.get(ENV_ROOT)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_path

    return user_data_path("napari-mris", appauthor=False) / "adapters"


def _model_hash(model_dir: str | Path) -> str:
    from napari_mris.model import modeldir  # imports torch: only when adapters are actually looked up

    return modeldir.model_hash(model_dir)


def adapters_folder(model_dir: str | Path) -> Path:
    """Where the adapters of the model in `model_dir` live (the folder need not exist)."""
    return adapters_root() / _model_hash(model_dir)[:HASH_CHARS]


def adapter_dir(model_dir: str | Path, name: str) -> Path:
    """The folder of adapter `name` of this model; a name is one plain path component."""
    if not name or "/" in name or "\\" in name or name in {".", ".."} or name.startswith("."):
        raise ModelDirectoryError(f"invalid adapter name {name!r}: use a plain name such as 'corrections-1'")
    return adapters_folder(model_dir) / name


def list_adapters(model_dir: str | Path) -> list[str]:
    """Names of the complete adapters of this model, sorted (an interrupted save leaves none behind)."""
    folder = adapters_folder(model_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / WEIGHTS).is_file())


def merged_adapter(llama: Any, model_dir: str | Path, name: str) -> Any:
    """Load adapter `name` of this model (safetensors only), refuse it if it was trained on other base
    weights, and merge it into the peft-free `llama`."""
    from peft import PeftModel

    from napari_mris.model import modeldir

    folder = adapter_dir(model_dir, name)
    if not folder.is_dir():
        raise ModelDirectoryError(
            f"adapter {name!r} not found in {folder.parent} (available: {list_adapters(model_dir)})"
        )
    for required in (CONFIG, WEIGHTS, BASE):
        modeldir.require_file(folder, required)
    try:
        recorded = json.loads((folder / BASE).read_text(encoding="utf-8"))["base_model_hash"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelDirectoryError(f"{folder / BASE} does not hold a base_model_hash: {exc}") from exc
    actual = _model_hash(model_dir)
    if recorded != actual:
        raise ModelDirectoryError(
            f"adapter {folder} was trained on base model {recorded}, but {model_dir} holds model {actual}; "
            "retrain the adapter on this model"
        )
    try:
        peft_model = PeftModel.from_pretrained(llama, str(folder), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelDirectoryError(f"{folder / WEIGHTS} does not fit this decoder: {exc}") from exc
    return peft_model.merge_and_unload()


def adapter_evaluation(model_dir: str | Path, name: str) -> dict[str, Any] | None:
    """The adapter's stored held-back comparison (`EVALUATION`), or None when it has none or it is unreadable
    (an adapter trained without held-back corrections, or by hand)."""
    path = adapter_dir(model_dir, name) / EVALUATION
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def adapter_lesion_threshold(model_dir: str | Path, name: str) -> float:
    """The lesion map's cut that adapter `name` was calibrated with; lesion_snap's default for an adapter
    without a calibration (saved before there was one). A damaged calibration refuses the adapter: drawing
    with another border than the one its held-back comparison measured would mislead the user."""
    from napari_mris.lesion_snap import LESION_THRESHOLD

    path = adapter_dir(model_dir, name) / CALIBRATION
    if not path.is_file():
        return LESION_THRESHOLD
    try:
        threshold = json.loads(path.read_text(encoding="utf-8"))["lesion_threshold"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelDirectoryError(f"{path} does not hold a lesion_threshold: {exc}") from exc
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ModelDirectoryError(
            f"{path}: lesion_threshold must be a number strictly between 0 and 1, got {threshold!r}"
        )
    return float(threshold)


def save_adapter(
    peft_llama: Any,
    model_dir: str | Path,
    name: str,
    evaluation: dict[str, Any] | None = None,
    lesion_threshold: float | None = None,
) -> Path:
    """Save a peft-wrapped `decoder.llama` as this model's adapter `name`, replacing it atomically: a
    finished temporary folder is renamed into place, so a crash leaves the old adapter or none, and an
    `evaluation` (JSON-ready) or a `lesion_threshold` is never seen without its adapter or the other way round."""
    target = adapter_dir(model_dir, name)
    base_hash = _model_hash(model_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelDirectoryError(f"cannot create the adapters folder {target.parent}: {exc}") from exc
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        peft_llama.save_pretrained(str(staging), safe_serialization=True)
        (staging / BASE).write_text(json.dumps({"base_model_hash": base_hash}) + "\n", encoding="utf-8")
        if evaluation is not None:
            (staging / EVALUATION).write_text(json.dumps(evaluation) + "\n", encoding="utf-8")
        if lesion_threshold is not None:
            (staging / CALIBRATION).write_text(
                json.dumps({"lesion_threshold": lesion_threshold}) + "\n", encoding="utf-8"
            )
        if target.exists():
            old = target.with_name(f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
