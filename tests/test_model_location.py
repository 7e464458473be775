"""`model_location`: what "default" and a chosen folder mean, and the message for a wrong one (no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from napari_mris import model_location
from napari_mris.errors import ModelDirectoryError
from napari_mris.model_location import ENV_MODEL, model_path, model_problem, peek_config, resolve_model_dir


@pytest.fixture
def no_override(monkeypatch) -> None:
    monkeypatch.delenv(ENV_MODEL, raising=False)


def model_dir(root: Path, **config) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"format_version": 1, **config}), encoding="utf-8")
    return root


def test_default_is_the_packaged_model(no_override) -> None:
    assert model_path("default") == model_location.DEFAULT_MODEL_DIR
    assert model_path(Path("default")) == model_location.DEFAULT_MODEL_DIR  # a Path from a file dialog too
    assert model_path("~/models/x") == Path.home() / "models" / "x"


def test_a_missing_directory_is_named(tmp_path: Path, no_override) -> None:
    with pytest.raises(ModelDirectoryError, match="Model directory not found: .*nowhere"):
        resolve_model_dir(tmp_path / "nowhere")
    assert model_problem(tmp_path / "nowhere") == f"Model directory not found: {tmp_path / 'nowhere'}"


def test_a_missing_default_model_says_how_to_choose_one(tmp_path: Path, monkeypatch, no_override) -> None:
    monkeypatch.setattr(model_location, "DEFAULT_MODEL_DIR", tmp_path / "default")
    (tmp_path / "default").mkdir()  # a source checkout: the folder without the model's files
    with pytest.raises(ModelDirectoryError, match="default model is not installed.*--model DIR"):
        resolve_model_dir("default")


def test_a_folder_that_is_not_a_model_gets_a_message(tmp_path: Path, no_override) -> None:
    assert resolve_model_dir(tmp_path) == tmp_path  # a load reports the missing files one by one
    assert "is not a napari-mris model directory: it has no config.json" in model_problem(tmp_path)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    assert "cannot be read as JSON" in model_problem(tmp_path) and peek_config(tmp_path) == {}
    (tmp_path / "config.json").write_text("[1, 2]", encoding="utf-8")
    assert "does not hold a JSON object" in model_problem(tmp_path) and peek_config(tmp_path) == {}
    model_dir(tmp_path, format_version=7)
    assert "format_version 7; this napari-mris reads version 1" in model_problem(tmp_path)
    model_dir(tmp_path, default_order="raster")
    assert model_problem(tmp_path) is None and peek_config(tmp_path)["default_order"] == "raster"


def test_the_environment_variable_replaces_the_default(tmp_path: Path, monkeypatch) -> None:
    site = model_dir(tmp_path / "site model", model_id="site")
    monkeypatch.setenv(ENV_MODEL, str(site))
    assert resolve_model_dir("default") == site and peek_config("default")["model_id"] == "site"
    assert resolve_model_dir(tmp_path) == tmp_path  # an explicit directory still wins
    monkeypatch.setenv(ENV_MODEL, str(tmp_path / "gone"))
    with pytest.raises(ModelDirectoryError, match=f"\\${ENV_MODEL} names .*gone, which is not a directory"):
        resolve_model_dir("default")


def test_locating_a_model_does_not_import_torch() -> None:
    """The dock widget shows the model's order, examples and problems before the first Segment loads torch."""
    code = (
        "import sys; from napari_mris import model_location as m; m.model_problem('default'); "
        "m.peek_config('default'); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
