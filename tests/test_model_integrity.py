"""Weights integrity: the SHA256SUMS manifest of a model directory, verified on every load.

The damage simulated here is the one a user reported: bytes flipped in place (same size), which safetensors
and JSON parsers may accept while the model silently draws other masks.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from napari_mris.errors import ModelDirectoryError
from napari_mris.model.decoder_files import load_decoder
from napari_mris.model.modeldir import (
    MANIFEST_NAME,
    model_files,
    model_hash,
    read_manifest,
    update_config,
    verify_model_dir,
    write_manifest,
)
from napari_mris.model_location import DEFAULT_MODEL_DIR
from napari_mris.pipeline import MRISPipeline
from napari_mris.tokenizers import load_tokenizers

RUNTIME_FILES = [
    "config.json",
    "image_tokenizer.safetensors",
    "mask_tokenizer.safetensors",
    "model.safetensors",
    "tokenizer.json",
]


@pytest.fixture(scope="module")
def manifested(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (a training run dir: cache, checkpoints, log) copied and given a manifest."""
    model = tmp_path_factory.mktemp("manifested") / "model"
    shutil.copytree(tiny_model_dir, model)
    write_manifest(model)
    return model


def _copy(model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model, target, ignore=shutil.ignore_patterns("cache", "checkpoints"))
    return target


def _flip_bytes(path: Path, count: int = 16) -> None:
    """Invert `count` bytes in the middle of the file: same size, different content."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_lists_the_runtime_files_only_in_sha256sum_format(manifested):
    assert model_files(manifested) == RUNTIME_FILES  # not the cache, checkpoints, train_log.jsonl or MODEL_CARD.md
    assert sorted(read_manifest(manifested)) == RUNTIME_FILES
    if shutil.which("sha256sum"):  # the standard tool checks it too
        done = subprocess.run(["sha256sum", "-c", MANIFEST_NAME], cwd=manifested, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_verified_load_and_hash_independent_of_the_manifest(manifested, tiny_model_dir):
    pipeline = MRISPipeline.from_pretrained(manifested, device="cpu")
    assert pipeline.weights_verified and pipeline.info()["weights_verified"] is True
    unverified = MRISPipeline.from_pretrained(tiny_model_dir, device="cpu")  # a run dir: loads, unverified
    assert not unverified.weights_verified
    assert pipeline.model_hash == unverified.model_hash == model_hash(tiny_model_dir)


@pytest.mark.parametrize("name", RUNTIME_FILES)
def test_flipped_bytes_in_each_file_are_refused_naming_it(manifested, tmp_path, name):
    model = _copy(manifested, tmp_path)
    size = (model / name).stat().st_size
    _flip_bytes(model / name)
    assert (model / name).stat().st_size == size
    with pytest.raises(ModelDirectoryError, match=rf"{name} is damaged or was changed") as info:
        MRISPipeline.from_pretrained(model, device="cpu")
    assert str(model / name) in str(info.value) and MANIFEST_NAME in str(info.value)
    assert verify_model_dir(manifested).verified  # the original is untouched
    # the loaders themselves (training, export, eval use them directly) refuse the file they read
    with pytest.raises(ModelDirectoryError, match=name):
        load_decoder(model) if name in ("config.json", "model.safetensors") else load_tokenizers(model)


def test_hash_covers_every_file(tiny_model_dir, tmp_path):
    """A damaged mask tokenizer once left the hash unchanged (it covered config.json and the decoder only)."""
    model = _copy(tiny_model_dir, tmp_path)
    before = model_hash(model)
    _flip_bytes(model / "mask_tokenizer.safetensors")
    assert model_hash(model) != before
    (model / "train_log.jsonl").write_text("{}\n")  # logs, docs and adapters are not the model
    (model / "MODEL_CARD.md").write_text("notes")
    (model / "adapters" / "mine").mkdir(parents=True)
    (model / "adapters" / "mine" / "adapter_model.safetensors").write_bytes(b"x")
    after = model_hash(model)
    _flip_bytes(model / "mask_tokenizer.safetensors")  # flip back
    assert model_hash(model) == before != after


def test_missing_and_unlisted_files_are_refused(manifested, tmp_path):
    model = _copy(manifested, tmp_path)
    (model / "domain.json").write_text('{"threshold": 1.0}\n')  # a file some loader may read, added later
    with pytest.raises(ModelDirectoryError, match=r"domain\.json is not listed in .*SHA256SUMS.*write_manifest"):
        MRISPipeline.from_pretrained(model, device="cpu")
    write_manifest(model)  # the documented remedy
    assert "domain.json" in read_manifest(model) and verify_model_dir(model).verified
    (model / "image_tokenizer.safetensors").unlink()
    with pytest.raises(ModelDirectoryError, match=r"incomplete: image_tokenizer\.safetensors"):
        MRISPipeline.from_pretrained(model, device="cpu")


def test_malformed_manifest_is_refused(manifested, tmp_path):
    model = _copy(manifested, tmp_path)
    (model / MANIFEST_NAME).write_text("not a checksum line\n")
    with pytest.raises(ModelDirectoryError, match=r"SHA256SUMS line 1"):
        verify_model_dir(model)


def test_writes_through_modeldir_keep_the_manifest_current(manifested, tmp_path):
    model = _copy(manifested, tmp_path)
    update_config(model, model_id="renamed")  # e.g. a calibration step recording its result in config.json
    pipeline = MRISPipeline.from_pretrained(model, device="cpu")
    assert pipeline.weights_verified and pipeline.model_id == "renamed"


def test_the_shipped_default_model_verifies():
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the default model is not installed")
    check = verify_model_dir(DEFAULT_MODEL_DIR)
    assert check.verified and check.n_files == len(read_manifest(DEFAULT_MODEL_DIR))
