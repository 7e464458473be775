"""The corrections store: LViT layout, replace-on-duplicate, no identifiers, append-only, crash recovery."""

from __future__ import annotations

import csv
import itertools
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_mris.corrections import (
    JOURNAL_FILE,
    LOCK_FILE,
    CorrectionsStore,
    default_root,
    example_name,
    to_uint8,
)
from napari_mris.errors import DatasetError, PromptError

needs_fork = pytest.mark.skipif(
    sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
    reason="killing a child mid-save needs fork and SIGKILL (POSIX)",
)


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
    (entry,) = [json.loads(line) for line in (root / JOURNAL_FILE).read_text().splitlines()]
    assert entry["model_hash"] == "ab" and entry["prediction"] == f"pred/mask_{record.name}.png"
    assert not (root / ".staging").exists()


def test_same_image_and_prompt_replaces(tmp_path: Path) -> None:
    store = CorrectionsStore(tmp_path)
    image, mask = _pair()
    first = store.add(image, "lower left lung", mask, prediction=mask)
    mask2 = mask.copy()
    mask2[30:35, 30:35] = True
    second = store.add(image, "Lower  Left lung", mask2)  # case and spacing do not make a new example
    assert first.name == second.name
    assert len(store) == 1 and store.records()[0].prediction is None
    assert not (tmp_path / first.prediction).exists()  # the earlier prediction no longer describes this save
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / second.mask)) == 255, mask2)
    store.add(image, "upper right lung", mask)
    other_image, _ = _pair(seed=1)
    store.add(other_image, "lower left lung", mask)
    assert [r.prompt for r in store.records()] == ["Lower Left lung", "upper right lung", "lower left lung"]
    assert len(list((tmp_path / "labelcol").iterdir())) == 3
    with open(store.text_file, newline="") as handle:
        assert len(list(csv.reader(handle))) == 1 + 3  # one row per example, not per save


def test_saves_only_append(tmp_path: Path) -> None:
    """No save rewrites the index files: each one's content before a save is a prefix of it after."""
    store = CorrectionsStore(tmp_path)
    image, mask = _pair()
    before = {JOURNAL_FILE: b"", "corrections_text.csv": b""}
    for seed, prompt in [(0, "lower left lung"), (1, "upper lung"), (0, "lower left lung"), (2, "both lungs")]:
        store.add(_pair(seed)[0], prompt, mask)
        for name, old in before.items():
            new = (tmp_path / name).read_bytes()
            assert new.startswith(old) and new.endswith(b"\n")
            before[name] = new
    assert len(before[JOURNAL_FILE].splitlines()) == 4 and len(store) == 3


def test_names_carry_no_identifiers(tmp_path: Path) -> None:
    store = CorrectionsStore(tmp_path)
    image, mask = _pair()
    record = store.add(image, "lower left lung", mask)
    assert record.name == example_name(image, "lower left lung")
    assert record.name.startswith("mris_") and len(record.name) == 5 + 16
    entry = json.loads((tmp_path / JOURNAL_FILE).read_text())
    assert set(entry) == {
        "name", "image", "mask", "prediction", "prompt", "model_id", "model_hash", "shape", "spacing", "saved_utc"
    }  # fmt: skip


def test_loadable_by_lvit_loader(tmp_path: Path) -> None:
    data = pytest.importorskip("napari_mris_train.data")
    store = CorrectionsStore(tmp_path)
    image, mask = _pair()
    store.add(image, "lower left lung", mask, prediction=mask)
    store.add(_pair(seed=2)[0], "upper right lung", mask)
    store.add(image, "Lower left  lung", mask)  # a re-save adds no second description row
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


def test_damaged_journal_line_is_reported(tmp_path: Path) -> None:
    store = CorrectionsStore(tmp_path)
    store.add(*_pair()[:1], "lung", _pair()[1])
    with (tmp_path / JOURNAL_FILE).open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(DatasetError, match=r"corrections.jsonl line 2: the corrections journal is damaged"):
        store.records()


def test_open_cuts_torn_lines_and_discards_incomplete_stages(tmp_path: Path) -> None:
    store = CorrectionsStore(tmp_path)
    image, mask = _pair()
    record = store.add(image, "lower left lung", mask)
    journal, table = (tmp_path / JOURNAL_FILE).read_bytes(), store.text_file.read_bytes()
    with (tmp_path / JOURNAL_FILE).open("ab") as handle:
        handle.write(b'{"name": "mris_')  # a crash mid-append
    with store.text_file.open("ab") as handle:
        handle.write(b"mask_mris_0123")
    partial = tmp_path / ".staging" / "mris_0123456789abcdef.aaaa"
    partial.mkdir(parents=True)
    (partial / "img.png").write_bytes(b"\x89PNG half")  # no record.json: the stage never completed
    assert [r.name for r in store.records()] == [record.name]  # readers skip a torn tail

    reopened = CorrectionsStore(tmp_path)
    assert len(reopened.recovered) == 3, reopened.recovered
    assert (tmp_path / JOURNAL_FILE).read_bytes() == journal and store.text_file.read_bytes() == table
    assert not (tmp_path / ".staging").exists()
    assert CorrectionsStore(tmp_path).recovered == []  # a healthy store is left alone


def test_format_1_store_is_converted(tmp_path: Path) -> None:
    image, mask = _pair()
    name = example_name(image, "lung")
    for folder, file in [("img", f"{name}.png"), ("labelcol", f"mask_{name}.png"), ("img", "mris_orphan.png")]:
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / folder / file)
    (tmp_path / "labelcol" / ".mask_mris_x.abc.png").write_bytes(b"temp")
    (tmp_path / ".manifest.k2j3.json").write_text("{")
    entry = {
        "name": name, "image": f"img/{name}.png", "mask": f"labelcol/mask_{name}.png", "prediction": None,
        "prompt": "lung", "model_id": None, "model_hash": None, "shape": [40, 48], "spacing": [1, 1],
        "saved_utc": "2026-01-01T00:00:00+00:00",
    }  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "examples": [entry]}))
    (tmp_path / "corrections_text.csv").write_text("Image,Description\nmask_mris_orphan.png,lung\n")

    store = CorrectionsStore(tmp_path)
    assert [r.name for r in store.records()] == [name] and store.recovered
    assert not (tmp_path / "manifest.json").exists()
    assert store.text_file.read_text() == f"Image,Description\nmask_{name}.png,lung\n"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        ".lock", JOURNAL_FILE, "corrections_text.csv", f"img/{name}.png", f"labelcol/mask_{name}.png"
    ]  # fmt: skip


def test_damaged_format_1_manifest_is_reported(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest is damaged"):
        CorrectionsStore(tmp_path)


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


# ---------------------------------------------------------------------- crashes: SIGKILL of a saving child


def assert_consistent(root: Path) -> CorrectionsStore:
    """Reopen the store and check: every record has its files, no orphan, no temp file, the loader reads it."""
    store = CorrectionsStore(root)
    records = store.records()
    listed = {p for r in records for p in (r.image, r.mask, r.prediction) if p is not None}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert on_disk - listed == {JOURNAL_FILE, "corrections_text.csv", LOCK_FILE} & on_disk
    assert listed <= on_disk
    assert not (root / ".staging").exists()
    for record in records:  # no half-written pixels: every file decodes to the saved shape
        for path in (record.image, record.mask, record.prediction):
            if path is not None:
                assert np.asarray(Image.open(root / path)).shape == record.shape
    if records:
        with open(store.text_file, newline="") as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == ["Image", "Description"]
        assert [row[0] for row in rows[1:]] == [Path(r.mask).name for r in records]
        finetune = pytest.importorskip("napari_mris_train.finetune")
        split = finetune.open_dataset(root)  # what `napari-mris-train finetune --data <store>` reads
        assert len(split) == len(records) and not split.problems, split.problems
    return store


def _save_forever(root: str, seed: int) -> None:
    """Child: saves until killed, new examples and re-saves (with and without a prediction) mixed."""
    rng = random.Random(seed)
    store = CorrectionsStore(root)
    for i in itertools.count():
        image_seed = rng.randrange(8) if rng.random() < 0.4 else 1000 * seed + i
        image, mask = _pair(image_seed, shape=(96, 96))
        store.add(image, "lower left lung", mask, prediction=mask if rng.random() < 0.5 else None)


def _save_and_die_at_step(root: str, step: int, seed: int) -> None:
    """Child: one save that SIGKILLs itself before its `step`-th file-system call (any of them)."""
    counter = itertools.count()

    def dying(function):
        def call(*args, **kwargs):
            if next(counter) == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return call

    for name in ("open", "write", "fsync", "replace", "rename", "unlink", "rmdir", "mkdir", "ftruncate"):
        setattr(os, name, dying(getattr(os, name)))
    image, mask = _pair(seed)
    CorrectionsStore(root).add(image, "lower left lung", mask, prediction=mask if seed % 2 else None)


@needs_fork
def test_kill_at_every_step_of_a_save(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    root = tmp_path / "store"
    CorrectionsStore(root).add(*_pair(1)[:1], "lower left lung", _pair(1)[1])
    for seed in (1, 2):  # 1: re-save of an existing example with a prediction; 2: a new one without
        for step in itertools.count():
            child = context.Process(target=_save_and_die_at_step, args=(str(root), step, seed))
            child.start()
            child.join(60)
            assert child.exitcode in (0, -signal.SIGKILL), child.exitcode
            store = assert_consistent(root)
            if child.exitcode == 0:
                break
        assert step > 10  # the save really was cut at each of its steps
        assert example_name(_pair(seed)[0], "lower left lung") in {r.name for r in store.records()}


@needs_fork
def test_sigkill_at_random_moments_leaves_a_consistent_store(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    rng = random.Random(17)
    root = tmp_path / "store"
    repaired = 0
    for kill in range(30):
        child = context.Process(target=_save_forever, args=(str(root), kill))
        child.start()
        time.sleep(rng.uniform(0.02, 0.25))
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        repaired += bool(assert_consistent(root).recovered)
    assert repaired >= 3, f"only {repaired} of 30 kills hit a save mid-way"
    assert len(CorrectionsStore(root)) > 10
