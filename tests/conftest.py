"""Shared test fixtures.

Tests that need the real data beside the repository (`../shared/data`) use the `shared_data` fixture,
which skips with a clear reason on a fresh clone where that folder is absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# napari's canvas needs OpenGL: pytest-xvfb (a test dependency) starts a virtual X server when Xvfb is
# installed. Without Xvfb and without a display, fall back to Qt's offscreen platform (no canvas tests).
if shutil.which("Xvfb") is None and not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.pop("NAPARI_MRIS_MODEL", None)  # "default" is the shipped model in every test, not a site's own


@pytest.fixture(autouse=True, scope="session")
def user_adapters_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adapters go to a per-user folder (napari_mris.adapters): tests never write the real one."""
    folder = tmp_path_factory.mktemp("user_adapters")
    os.environ["NAPARI_MRIS_ADAPTERS"] = str(folder)  # also inherited by adaptation child processes
    return folder


SHARED_DATA = Path(os.environ.get("MRIS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (QaTa-COV19, ct-3slice); skips when it is not beside the repository."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set MRIS_SHARED_DATA to point at it)")
    return SHARED_DATA


def _data_folder(shared_data: Path, name: str) -> Path:
    """One data set of the real data folder; skips when that one is missing."""
    root = shared_data / name
    if not root.is_dir():
        pytest.skip(f"{name} not found at {root}")
    return root


@pytest.fixture(scope="session")
def qata_root(shared_data: Path) -> Path:
    return _data_folder(shared_data, "QaTa-COV19")


@pytest.fixture(scope="session")
def ct_3slice(shared_data: Path) -> Path:
    return _data_folder(shared_data, "ct-3slice")


# The tiny model for the pipeline, widget and CLI tests: defined here so that pytest builds it once per run.
from _model_fixtures import build_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir: Path):
    from napari_mris.pipeline import MRISPipeline

    return MRISPipeline.from_pretrained(tiny_model_dir, device="cpu")
