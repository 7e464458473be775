"""Domain guard: the shipped model's domain.safetensors passes chest X-rays and flags CT, natural images and
noise; the pipeline carries the score, the CLI refuses (unless --allow-out-of-domain), a model directory
without the file has no guard (napari_mris.domain, napari-mris-train domain)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
import skimage.color
import skimage.data
import torch
from PIL import Image

from napari_mris.cli import EXIT_NOTHING_SEGMENTED
from napari_mris.cli import main as cli_main
from napari_mris.domain import DOMAIN_FILE, DomainGuard, stem_digest
from napari_mris.errors import ModelDirectoryError
from napari_mris.io import read_slice
from napari_mris.model.decoder_files import load_decoder
from napari_mris.model_location import DEFAULT_MODEL_DIR
from napari_mris.phantom import write_lvit_dataset
from napari_mris.pipeline import MRISPipeline
from napari_mris_train.cli import main as train_main
from napari_mris_train.domain import calibrate_threshold

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"
PROMPT = "lower left lung"


@pytest.fixture(scope="module")
def default_pipeline() -> MRISPipeline:
    return MRISPipeline.from_pretrained("default", device="cpu")


def noise(seed: int = 0, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).random((size, size)).astype(np.float32)


def test_mahalanobis_score_and_threshold_calibration() -> None:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=generator)
    train = torch.randn(4000, 6, generator=generator, dtype=torch.float64) @ mixing.double() + 3.0
    guard = DomainGuard.fit(train, shrinkage=0.0)
    probe = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    cov = np.cov(train.numpy(), rowvar=False)
    centred = probe.numpy() - train.numpy().mean(0)
    expected = np.sqrt(np.einsum("ij,jk,ik->i", centred, np.linalg.inv(cov), centred))
    np.testing.assert_allclose(guard.scores(probe).numpy(), expected, rtol=1e-6)
    scores = torch.arange(1, 1430, dtype=torch.float64)  # 1,429 validation scores, as Val_Folder has
    threshold = calibrate_threshold(scores, 0.01)
    assert int((scores > threshold).sum()) == 14  # floor(1 % of 1,429): at most 1 % flagged
    assert threshold == 1415.5  # halfway between the highest passed and the lowest flagged score
    assert 50.0 < calibrate_threshold(scores[:50], 0.01) < 50.01  # under 100 images, 1 % allows none


@pytest.mark.parametrize("name", ["phantom_07.png", "phantom_11.png", "phantom_13_absent.png"])
def test_shipped_guard_passes_the_sample_chest_x_rays(default_pipeline, name) -> None:
    image = read_slice(SAMPLES / "img" / name, expect_2d=True)
    check = default_pipeline.domain(image.pixels, image.window)
    assert check is not None and not check.out_of_domain, check


def test_shipped_guard_passes_qata_validation_images(default_pipeline, qata_root) -> None:
    images = sorted((qata_root / "Val_Folder" / "img").glob("*.png"))[:20]
    checks = [default_pipeline.domain(read_slice(path, expect_2d=True).pixels) for path in images]
    assert sum(check.out_of_domain for check in checks) <= 1  # calibrated for 1 % false alarms on Val_Folder


def test_shipped_guard_flags_noise_a_natural_image_and_ct(default_pipeline) -> None:
    ct = read_slice(Path(pydicom.data.get_testdata_file("CT_small.dcm")), expect_2d=True)
    mr = read_slice(Path(pydicom.data.get_testdata_file("MR_small.dcm")), expect_2d=True)
    for label, pixels, window in (
        ("noise", noise(), None),
        ("camera", skimage.data.camera().astype(np.float32), None),
        ("astronaut", skimage.color.rgb2gray(skimage.data.astronaut()).astype(np.float32), None),
        ("CT_small", ct.pixels, ct.window),
        ("MR_small", mr.pixels, mr.window),
    ):
        check = default_pipeline.domain(pixels, window)
        assert check.out_of_domain, (label, check)
        assert "out of domain" in check.message() and f"{check.threshold:.1f}" in check.message()


def test_stream_carries_the_score_and_warns(default_pipeline) -> None:
    image = read_slice(SAMPLES / "img" / "phantom_07.png", expect_2d=True)
    result = default_pipeline.segment(image.pixels, PROMPT, window=image.window)
    assert result.domain_score is not None and not result.out_of_domain
    assert result.provenance()["domain_score"] == result.domain_score
    assert not any("out of domain" in note for note in result.warnings)
    updates = list(default_pipeline.stream(noise(1), PROMPT, order="scale"))
    threshold = default_pipeline.domain_guard.threshold
    assert updates and all(u.out_of_domain and u.domain_score > threshold for u in updates)
    assert updates[-1].finished and any(note.startswith("out of domain") for note in updates[-1].warnings)


def test_cli_refuses_out_of_domain_slices_unless_allowed(tmp_path, capsys) -> None:
    Image.fromarray((noise(2) * 255).astype(np.uint8)).save(tmp_path / "noise.png")
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "noise.png"), "--prompt", PROMPT, "--out", str(out), "--device", "cpu"]
    assert cli_main(args) == EXIT_NOTHING_SEGMENTED
    captured = capsys.readouterr()
    assert "noise.png: refused, out of domain" in captured.out and "nothing was segmented" in captured.err
    assert not (out / "mask_noise.png").exists()

    mixed = ["predict", str(SAMPLES / "img" / "phantom_07.png"), *args[1:]]
    assert cli_main(mixed) == 0  # something was segmented: success, the refusal is reported
    assert (out / "mask_phantom_07.png").is_file() and not (out / "mask_noise.png").exists()
    assert "refused" in capsys.readouterr().out

    assert cli_main([*args, "--allow-out-of-domain"]) == 0
    assert (out / "mask_noise.png").is_file()
    assert "out of domain" in capsys.readouterr().out  # still said, as a note on the segmented line


def test_model_without_the_file_has_no_guard(tiny_pipeline) -> None:  # noqa: F811
    assert tiny_pipeline.domain_guard is None and tiny_pipeline.domain(noise()) is None
    update = list(tiny_pipeline.stream(noise(size=40), PROMPT))[-1]
    assert update.domain_score is None and not update.out_of_domain


def test_domain_command_writes_a_guard_the_pipeline_uses(tmp_path, tiny_model_dir) -> None:  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("cache", "checkpoints", "SHA256SUMS"))
    data = write_lvit_dataset(tmp_path / "phantoms", n_train=24, n_val=10, size=32, seed=3)
    assert train_main(["domain", "--model", str(model), "--data", str(data)]) == 0
    pipeline = MRISPipeline.from_pretrained(model, device="cpu")
    guard = pipeline.domain_guard
    assert guard is not None and guard.info["n_train"] == 24 and guard.info["val_flagged"] == 0
    assert guard.info["stem_sha256"] == stem_digest(pipeline.decoder.pixel_stem)
    val_image = read_slice(next((data / "Val_Folder" / "img").iterdir()), expect_2d=True)
    assert not pipeline.domain(val_image.pixels).out_of_domain  # the threshold is the highest val score
    assert pipeline.segment(val_image.pixels, PROMPT).domain_score is not None


def test_guard_of_another_stem_is_refused(tmp_path) -> None:
    decoder, _ = load_decoder(DEFAULT_MODEL_DIR)
    guard = DomainGuard.load(DEFAULT_MODEL_DIR, decoder.pixel_stem)
    assert guard is not None
    with torch.no_grad():
        for parameter in decoder.pixel_stem.parameters():  # as `export --float16` stores it: still this stem
            parameter.copy_(parameter.half().float())
    assert DomainGuard.load(DEFAULT_MODEL_DIR, decoder.pixel_stem) is not None
    with torch.no_grad():
        decoder.pixel_stem.stages[0][0].weight.add_(0.01)  # a retrained stem: the statistics no longer hold
    with pytest.raises(ModelDirectoryError, match="another pixel stem"):
        DomainGuard.load(DEFAULT_MODEL_DIR, decoder.pixel_stem)
    guard.mean, guard.whitening = guard.mean[:4], guard.whitening[:4, :4]
    guard.save(tmp_path)
    with pytest.raises(ModelDirectoryError, match="4 features"):
        DomainGuard.load(tmp_path, decoder.pixel_stem)
    (tmp_path / DOMAIN_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelDirectoryError, match="not a readable domain guard"):
        DomainGuard.load(tmp_path, decoder.pixel_stem)
