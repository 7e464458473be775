"""The corrections store: LViT layout, replace-on-duplicate, no identifiers, crash-safe index."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_mris.corrections import CorrectionsStore, default_root, example_name, to_uint8
from napari_mris.errors import DatasetError, PromptError


def _pair(seed: int = 0, shape=(40, 48)):
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 30.0, shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[10:20, 12:30] = True
    return image, mask


def test_add_writes_lvit_layout(tmp_path: Path) -> None:
    store = CorrectionsStore(tmp_path / "store")
    image, mask = _pair()
    prediction = np.zeros_like(mask)
    prediction[10:18, 12:25] = True
    record = store.add(image, "  Lower   left lung\n", mask, prediction=prediction, model_id="tiny", model_hash="ab")

    root = tmp_path / "store"
    assert record.prompt == "Lower left lung"
    saved_mask = np.asarray(Image.open(root / record.mask))
    assert saved_mask.dtype == np.uint8 and set(np.unique(saved_mask)) == {0, 255}
    np.testing.assert_array_equal(saved_mask == 255, mask)
    np.testing.assert_array_equal(np.asarray(Image.open(root / record.prediction)) == 255, prediction)
    saved_image = np.asarray(Image.open(root / record.image))
    assert saved_image.shape == image.shape and saved_image.dtype == np.uint8
    with open(store.text_file, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["Image", "Description"], [f"mask_{record.name}.png", "Lower left lung"]]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["examples"][0]["model_hash"] == "ab"
    assert manifest["examples"][0]["prediction"] == f"pred/mask_{record.name}.png"


def test_same_image_and_prompt_replaces(tmp_path: Path) -> None:
    store = CorrectionsStore(tmp_path)
    image, mask = _pair()
    first = store.add(image, "lower left lung", mask)
    mask2 = mask.copy()
    mask2[30:35, 30:35] = True
    second = store.add(image, "Lower  Left lung", mask2)  # case and spacing do not make a new example
    assert first.name == second.name
    assert len(store) == 1
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / second.mask)) == 255, mask2)
    store.add(image, "upper right lung", mask)
    other_image, _ = _pair(seed=1)
    store.add(other_image, "lower left lung", mask)
    assert len(store) == 3
    assert len(list((tmp_path / "labelcol").iterdir())) == 3


def test_names_carry_no_identifiers(tmp_path: Path) -> None:
    store = CorrectionsStore(tmp_path)
    image, mask = _pair()
    record = store.add(image, "lower left lung", mask)
    assert record.name == example_name(image, "lower left lung")
    assert record.name.startswith("mris_") and len(record.name) == 5 + 16
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["examples"][0]) == {
        "name", "image", "mask", "prediction", "prompt", "model_id", "model_hash", "shape", "spacing", "saved_utc"
    }  # fmt: skip


def test_loadable_by_lvit_loader(tmp_path: Path) -> None:
    data = pytest.importorskip("napari_mris_train.data")
    store = CorrectionsStore(tmp_path)
    image, mask = _pair()
    store.add(image, "lower left lung", mask, prediction=mask)
    store.add(_pair(seed=2)[0], "upper right lung", mask)
    split = data.load_split(tmp_path)
    assert len(split) == 2 and not split.problems
    example = split[0]
    assert example.description == "lower left lung"
    np.testing.assert_array_equal(example.mask, mask)


def test_bad_input_is_rejected_without_touching_the_store(tmp_path: Path) -> None:
    store = CorrectionsStore(tmp_path)
    image, mask = _pair()
    with pytest.raises(PromptError):
        store.add(image, "  ", mask)
    with pytest.raises(DatasetError, match="must match"):
        store.add(image, "lung", mask[:10])
    with pytest.raises(DatasetError, match="2D slice"):
        store.add(np.zeros((2, 4, 4)), "lung", np.zeros((2, 4, 4)))
    assert not any(tmp_path.iterdir())


def test_damaged_manifest_is_reported(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="damaged"):
        CorrectionsStore(tmp_path).records()


def test_crash_before_index_keeps_store_consistent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CorrectionsStore(tmp_path)
    image, mask = _pair()
    store.add(image, "lower left lung", mask)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(CorrectionsStore, "_write_index", crash)
    with pytest.raises(OSError):
        store.add(_pair(seed=3)[0], "upper lung", mask)
    monkeypatch.undo()
    records = store.records()
    assert [r.prompt for r in records] == ["lower left lung"]
    for record in records:
        assert (tmp_path / record.image).is_file() and (tmp_path / record.mask).is_file()
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary files left behind


def test_default_root_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAPARI_MRIS_HOME", str(tmp_path))
    assert default_root() == tmp_path / "corrections"
    assert CorrectionsStore().root == tmp_path / "corrections"


def test_to_uint8_windowing() -> None:
    ct = np.array([[-1000.0, 0.0], [40.0, 400.0]], np.float32)
    out = to_uint8(ct, (-160.0, 240.0))
    assert out.tolist() == [[0, 102], [128, 255]]
    png = np.array([[0, 7], [200, 255]], np.uint8)
    assert to_uint8(png, None) is png
