"""The LViT-layout loader: pairing rules, reported problems, pixel reading and the real QaTa-COV19 split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import io as skio

from napari_mris.errors import DatasetError
from napari_mris.phantom import write_lvit_dataset, write_text_table
from napari_mris_train.cli import main as train_cli
from napari_mris_train.data import Example, concat_splits, load_split, read_text_table


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    skio.imsave(path, pixels, check_contrast=False)


def _split(tmp_path: Path, names: list[str], folder: str = "Train_Folder") -> Path:
    """A split folder with 8x8 images, 0/255 masks and a text table for `names`."""
    split = tmp_path / folder
    rng = np.random.default_rng(0)
    for name in names:
        _png(split / "img" / f"{name}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
        mask = np.zeros((8, 8), np.uint8)
        mask[2:5, 1:4] = 255
        _png(split / "labelcol" / f"mask_{name}.png", mask)
    write_text_table(split / "Train_text.xlsx", [(f"mask_{n}.png", f"finding in {n}") for n in names])
    return split


def test_split_pairs_and_reads_pixels(tmp_path: Path) -> None:
    split = load_split(_split(tmp_path, ["a", "b", "c"]))
    assert len(split) == 3
    assert split.descriptions == ["finding in a", "finding in b", "finding in c"]
    assert split.problems == []
    example = split[1]
    assert isinstance(example, Example)
    assert example.name == "b"
    assert example.image.dtype == np.uint8 and example.image.shape == (8, 8)
    assert example.mask.dtype == bool and int(example.mask.sum()) == 9
    assert example.mask[2:5, 1:4].all()


def test_root_plus_split_name_case_insensitive(tmp_path: Path) -> None:
    _split(tmp_path, ["a"], folder="TRAIN_FOLDER")
    _split(tmp_path, ["v"], folder="val_folder")
    assert load_split(tmp_path, split="train").names == ["a"]
    assert load_split(tmp_path, split="Val").names == ["v"]
    with pytest.raises(DatasetError, match="split='train'"):
        load_split(tmp_path)  # a root without a split name: the message says what to pass
    with pytest.raises(DatasetError, match="Test_Folder"):
        load_split(tmp_path, split="test")
    with pytest.raises(DatasetError, match="unknown split"):
        load_split(tmp_path, split="holdout")


def test_not_lvit_layout_says_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    with pytest.raises(DatasetError, match="labelcol"):
        load_split(tmp_path)
    (tmp_path / "labelcol").mkdir()
    with pytest.raises(DatasetError, match="_text.xlsx"):
        load_split(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        load_split(tmp_path / "missing")


def test_csv_semicolon_names_without_prefix_or_extension(tmp_path: Path) -> None:
    split = tmp_path / "Val_Folder"
    rng = np.random.default_rng(1)
    _png(split / "Img" / "Study_1.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    _png(split / "Img" / "study_2.jpg", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    _png(split / "LabelCol" / "MASK_study_1.png", np.eye(6, dtype=np.uint8))  # a 0/1 mask
    _png(split / "LabelCol" / "mask_study_2.png", np.eye(6, dtype=np.uint8) * 255)
    (split / "val_TEXT.csv").write_text(
        "image;DESCRIPTION\nstudy_1;Unilateral pulmonary infection, one infected area, lower left lung.\n"
        "mask_Study_2.PNG;Bilateral pulmonary infection, two infected areas, all left lung and lower right lung.\n",
        encoding="utf-8",
    )
    loaded = load_split(split)
    assert loaded.problems == []
    assert loaded.names == ["Study_1", "study_2"]
    assert loaded.descriptions[1].startswith("Bilateral pulmonary infection, two infected areas")
    first, second = loaded[0], loaded[1]
    assert first.mask.sum() == 6 and np.array_equal(first.mask, np.eye(6, dtype=bool))
    assert second.image.ndim == 2 and second.image.dtype == np.uint8  # a JPEG RGB image read as gray
    assert np.array_equal(second.mask, np.eye(6, dtype=bool))


def test_comma_csv_with_quoted_descriptions(tmp_path: Path) -> None:
    split = _split(tmp_path, ["a"])
    (split / "Train_text.xlsx").unlink()
    write_text_table(split / "Train_text.csv", [("mask_a.png", "Bilateral, two areas, all left lung.")])
    assert read_text_table(split / "Train_text.csv") == [("mask_a.png", "Bilateral, two areas, all left lung.")]
    assert load_split(split).descriptions == ["Bilateral, two areas, all left lung."]


def test_dropped_pairs_are_reported_by_name(tmp_path: Path) -> None:
    split = _split(tmp_path, ["ok", "nomask", "notext", "empty", "dup"])
    (split / "labelcol" / "mask_nomask.png").unlink()
    (split / "img" / "empty.png").write_bytes(b"")
    _png(split / "labelcol" / "mask_orphan.png", np.zeros((8, 8), np.uint8))
    rows = [(f"mask_{n}.png", f"finding in {n}") for n in ("ok", "nomask", "empty", "dup", "dup", "ghost")]
    rows.append(("mask_blank.png", ""))
    write_text_table(split / "Train_text.xlsx", rows)
    loaded = load_split(split)
    assert loaded.names == ["ok", "dup"]
    problems = "\n".join(loaded.problems)
    assert "no mask mask_nomask.png" in problems
    assert "notext.png: no description" in problems
    assert "empty.png: unreadable (empty file)" in problems
    assert "second description for 'mask_dup.png'" in problems
    assert "'mask_ghost.png' not found" in problems
    assert "mask_orphan.png: mask without an image" in problems
    assert "'mask_blank.png' not found" in problems
    assert "kept 2 pairs, dropped 7" in loaded.summary()


def test_no_usable_pair_is_an_error(tmp_path: Path) -> None:
    split = _split(tmp_path, ["a"])
    (split / "labelcol" / "mask_a.png").unlink()
    with pytest.raises(DatasetError, match="no usable"):
        load_split(split)


def test_wrong_header_names_the_file(tmp_path: Path) -> None:
    split = _split(tmp_path, ["a"])
    (split / "Train_text.xlsx").unlink()
    (split / "Train_text.csv").write_text("file,text\na.png,x\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"Train_text.csv.*'Image' and 'Description'"):
        load_split(split)


def test_corrupt_png_raises_at_access(tmp_path: Path) -> None:
    split = _split(tmp_path, ["a", "b"])
    bad = split / "img" / "b.png"
    bad.write_bytes(bad.read_bytes()[:20])  # truncated: exists and is not empty, so found eagerly
    loaded = load_split(split)
    assert len(loaded) == 2
    assert loaded[0].name == "a"
    with pytest.raises(DatasetError, match=r"b\.png: cannot read"):
        loaded[1]


def test_mask_of_another_size_raises(tmp_path: Path) -> None:
    split = _split(tmp_path, ["a"])
    _png(split / "labelcol" / "mask_a.png", np.zeros((4, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"mask_a\.png: mask is 8x4 pixels"):
        load_split(split)[0]


def test_phantom_dataset_is_loadable(tmp_path: Path) -> None:
    root = write_lvit_dataset(tmp_path / "phantoms", n_train=6, n_val=2, size=32, seed=3)
    train, val = load_split(root, split="train"), load_split(root, split="val")
    assert (len(train), len(val)) == (6, 2)
    assert train.problems == [] and val.problems == []
    example = train[0]
    assert example.image.shape == (32, 32) and example.mask.any()
    assert example.description.endswith("lung.")
    assert train.names[0] == "phantom_00000"
    assert not np.array_equal(example.image, val[0].image)  # train and val phantoms use different seeds


def test_phantoms_command_and_concat_splits(tmp_path: Path) -> None:
    assert train_cli(["phantoms", "--out", str(tmp_path / "a"), "--train", "3", "--val", "1", "--size", "32"]) == 0
    phantoms = load_split(tmp_path / "a", split="train")
    other = tmp_path / "b" / "Train_Folder"
    _png(other / "img" / "x.png", np.full((8, 8), 7, np.uint8))
    _png(other / "labelcol" / "mask_x.png", np.zeros((8, 8), np.uint8))
    write_text_table(other / "Train_text.csv", [("mask_x.png", "Unilateral pulmonary infection.")])
    combined = concat_splits([phantoms, load_split(other)])
    assert len(combined) == 4 and combined.names[-1] == "x"
    assert combined[3].image.shape == (8, 8) and combined[0].image.shape == (32, 32)
    with pytest.raises(DatasetError, match="share image names"):
        concat_splits([phantoms, phantoms])


def test_qata_counts(qata_root: Path) -> None:
    train = load_split(qata_root, split="train")
    val = load_split(qata_root / "Val_Folder")
    assert (len(train), len(val)) == (5716, 1429)
    assert train.problems == [] and val.problems == []
    assert train.pairs[0][2].name.lower().startswith("mask_")
