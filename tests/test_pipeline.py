"""MRISPipeline on a tiny model: streaming shapes, legal codes, determinism, [REJ], consensus, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _model_fixtures import force_decision

from napari_mris import model_location
from napari_mris import pipeline as pipeline_module
from napari_mris.errors import ModelDirectoryError, MRISError, PromptError, UnsupportedImageError
from napari_mris.pipeline import MRISPipeline

PROMPT = "lower left lung"


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((45, 61)) * 1000 - 200).astype(np.float32)  # odd size, CT-like range


@pytest.fixture
def present(tiny_pipeline):  # noqa: F811
    with force_decision(tiny_pipeline, "SOV"):
        yield tiny_pipeline


@pytest.mark.parametrize("order", ["scale", "raster"])
def test_stream_gives_masks_at_input_resolution(present, image, order) -> None:
    updates = list(present.stream(image, PROMPT, order=order))
    scales = present.tokenizers.masks[order].scales
    expected_updates = len(scales) if order == "scale" else scales[-1]  # one per scale / per raster row
    assert len(updates) == expected_updates
    for update in updates:
        assert update.mask.shape == image.shape and update.mask.dtype == bool
        assert update.probability.shape == image.shape and update.probability.dtype == np.float32
        assert update.uncertainty is None and not update.rejected
        np.testing.assert_array_equal(update.mask, update.probability >= 0.5)
    assert [u.finished for u in updates] == [False] * (len(updates) - 1) + [True]
    progress = [u.progress for u in updates]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert updates[-1].tokens_done == updates[-1].tokens_total == sum(s * s for s in scales)
    assert {"preprocess_s", "first_update_s", "total_s", "tokens_per_s"} <= set(updates[-1].timings)


@pytest.mark.parametrize("order", ["scale", "raster"])
def test_only_legal_mask_codes_reach_the_tokenizer(present, image, order, monkeypatch) -> None:
    tokenizer = present.tokenizers.masks[order]
    seen: list[list[torch.Tensor]] = []
    original = tokenizer.decode

    def spy(codes, *args, **kwargs):
        seen.append([c.clone() for c in codes])
        return original(codes, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", spy)
    list(present.stream(image, PROMPT, order=order))
    assert seen
    for codes in seen:
        for size, scale_codes in zip(tokenizer.scales, codes, strict=False):
            assert scale_codes.shape[-1] == size * size
            assert int(scale_codes.min()) >= 0 and int(scale_codes.max()) < tokenizer.codebook_size


def test_greedy_is_deterministic(present, image) -> None:
    first = present.segment(image, PROMPT, order="raster")
    second = present.segment(image, PROMPT, order="raster")
    np.testing.assert_array_equal(first.probability, second.probability)
    assert first.settings.temperature == 0.0 and first.model_hash == present.model_hash


def test_rejection_paints_nothing(tiny_pipeline, image) -> None:  # noqa: F811
    with force_decision(tiny_pipeline, "REJ"):
        updates = list(tiny_pipeline.stream(image, PROMPT))
    assert len(updates) == 1
    (update,) = updates
    assert update.rejected and update.finished and update.probability is None
    assert update.mask.shape == image.shape and not update.mask.any()


def test_reject_probability_is_the_decision_read_as_a_probability(tiny_pipeline, image) -> None:  # noqa: F811
    """Every answer carries p([REJ]) from the presence decision; the answer follows it (the decision is the
    more likely of the two tokens), alone and when findings are decoded together."""
    with force_decision(tiny_pipeline, "REJ"):
        assert tiny_pipeline.segment(image, PROMPT).reject_probability > 0.99
    with force_decision(tiny_pipeline, "SOV"):
        assert tiny_pipeline.segment(image, PROMPT).reject_probability < 0.01
    prompts = [PROMPT, "upper right lung", "bilateral pulmonary infection", "middle left lung"]
    alone = [tiny_pipeline.segment(image, prompt) for prompt in prompts]
    together = tiny_pipeline.segment_findings(image, prompts)
    for one, batched in zip(alone, together, strict=True):
        assert 0.0 <= one.reject_probability <= 1.0
        assert one.rejected == (one.reject_probability > 0.5)
        assert batched.reject_probability == pytest.approx(one.reject_probability, abs=1e-4)
        assert batched.provenance()["reject_probability"] == batched.reject_probability


def test_a_calibrated_reject_threshold_decides_not_present(tiny_model_dir, tmp_path, image) -> None:  # noqa: F811
    """config.json `reject_threshold` moves the cut: "not present" exactly when p([REJ]) is above it, alone and
    together; a threshold outside (0, 1] is refused when the model loads."""
    import shutil

    from napari_mris.model.modeldir import update_config

    prompts = [PROMPT, "upper right lung", "bilateral pulmonary infection", "middle left lung", "lower right lung"]
    base = MRISPipeline.from_pretrained(tiny_model_dir, device="cpu")
    assert base.reject_threshold == 0.5 and base.info()["reject_threshold"] == 0.5
    probabilities = [base.segment(image, prompt).reject_probability for prompt in prompts]
    assert max(probabilities) > min(probabilities)
    cut = (max(probabilities) + min(probabilities)) / 2
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    update_config(model, reject_threshold=cut)
    calibrated = MRISPipeline.from_pretrained(model, device="cpu")
    assert calibrated.model_hash != base.model_hash  # the threshold is part of the model
    expected = [p > cut for p in probabilities]
    assert any(expected) and not all(expected)
    assert [calibrated.segment(image, prompt).rejected for prompt in prompts] == expected
    assert [r.rejected for r in calibrated.segment_findings(image, prompts)] == expected
    for bad in (0.0, 1.5, "0.4", True):
        update_config(model, reject_threshold=bad)
        with pytest.raises(ModelDirectoryError, match="reject_threshold"):
            MRISPipeline.from_pretrained(model, device="cpu")


def test_consensus_of_samples_gives_uncertainty(present, image) -> None:
    result = present.segment(image, PROMPT, samples=3, seed=3)
    assert result.settings.samples == 3 and result.settings.temperature > 0  # sampling switched on for consensus
    assert result.uncertainty.shape == image.shape and result.uncertainty.dtype == np.float32
    assert float(result.uncertainty.min()) >= 0.0 and float(result.uncertainty.max()) <= 0.5
    again = present.segment(image, PROMPT, samples=3, seed=3)
    np.testing.assert_array_equal(result.probability, again.probability)  # a seed makes sampling repeatable


def test_huge_image_is_downsampled_and_mask_upsampled(present) -> None:
    huge = np.zeros((2600, 2100), np.float32)
    huge[500:900, 300:700] = 1000.0
    result = present.segment(huge, PROMPT, order="scale")
    assert result.mask.shape == huge.shape and result.probability.shape == huge.shape


def test_bad_images_are_refused_clearly(present) -> None:
    with pytest.raises(UnsupportedImageError, match="RGB"):
        present.segment(np.zeros((32, 32, 3), np.uint8), PROMPT)
    with pytest.raises(UnsupportedImageError, match="pick one slice"):
        present.segment(np.zeros((5, 32, 32), np.float32), PROMPT)
    with pytest.raises(UnsupportedImageError, match="NaN"):
        present.segment(np.full((32, 32), np.nan, np.float32), PROMPT)


def test_prompt_checks(present, image) -> None:
    for empty in ("", "   \n", "..."):
        with pytest.raises(PromptError):
            present.segment(image, empty)
    limit = present.tokenizers.text.max_length
    # a long finding that names its place at the end: refused up front (check_prompt, as the CLI asks) and by
    # segment, never answered for its first `limit` tokens
    overlong = "bilateral pulmonary infection " * limit + "in the lower left lung"
    with pytest.raises(PromptError, match=f"reads at most {limit}"):
        present.check_prompt(overlong)
    with pytest.raises(PromptError, match=f"reads at most {limit}"):
        present.segment(image, overlong)


def test_decoding_options_are_checked(present, image) -> None:
    with pytest.raises(MRISError, match="raster order only"):
        present.segment(image, PROMPT, order="scale", beam=2)
    with pytest.raises(MRISError, match="samples"):
        present.segment(image, PROMPT, samples=0)
    with pytest.raises(MRISError, match="cannot decode"):
        present.segment(image, PROMPT, order="spiral")


def test_beam_search_runs_in_raster_order(present, image) -> None:
    result = present.segment(image, PROMPT, order="raster", beam=2)
    assert result.finished and result.mask.shape == image.shape and result.settings.beam == 2


def test_should_stop_ends_the_stream_early(present, image) -> None:
    updates = []
    stream = present.stream(image, PROMPT, order="raster", should_stop=lambda: len(updates) >= 1)
    updates.extend(stream)
    assert len(updates) == 1 and not updates[0].finished


def test_missing_default_model_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(model_location, "DEFAULT_MODEL_DIR", tmp_path / "default")
    monkeypatch.delenv(model_location.ENV_MODEL, raising=False)
    with pytest.raises(ModelDirectoryError, match="default model is not installed"):
        MRISPipeline.from_pretrained("default")
    with pytest.raises(ModelDirectoryError, match="not found"):
        MRISPipeline.from_pretrained(tmp_path / "nowhere")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_cuda_without_gpu_is_a_clear_error(tiny_model_dir) -> None:  # noqa: F811
    with pytest.raises(MRISError, match="no usable CUDA"):
        MRISPipeline.from_pretrained(tiny_model_dir, device="cuda")


def test_info_names_model_device_and_versions(tiny_pipeline) -> None:  # noqa: F811
    info = tiny_pipeline.info()
    assert info["model_hash"] == tiny_pipeline.model_hash and info["device"] == "cpu"
    assert set(info["orders"]) == {"raster", "scale"}
    assert {"napari-mris", "torch", "transformers"} <= set(info["versions"])


FINDINGS = ["lower left lung", "upper right lung infection", "bilateral pulmonary infection, two infected areas"]


@pytest.mark.parametrize("order", ["raster", "scale"])
@pytest.mark.parametrize("options", [{}, {"samples": 2, "seed": 5}], ids=["greedy", "sampled"])
def test_several_findings_equal_separate_calls(present, image, order, options, monkeypatch) -> None:
    """One call for three findings reads the image once and gives each finding exactly its own mask (the tiny
    model hardly reads the text; tests/test_generate.py checks that each finding follows its own text)."""
    alone = [present.segment(image, prompt, order=order, **options) for prompt in FINDINGS]
    prefills = []
    original = pipeline_module.prefill_image
    monkeypatch.setattr(pipeline_module, "prefill_image", lambda *a, **k: prefills.append(1) or original(*a, **k))
    together = present.segment_findings(image, FINDINGS, order=order, **options)
    assert len(prefills) == 1  # the image part once, for all three findings
    assert [r.prompt for r in together] == FINDINGS
    for one, joint in zip(alone, together, strict=True):
        np.testing.assert_array_equal(joint.mask, one.mask)
        np.testing.assert_array_equal(joint.probability, one.probability)
        assert joint.finished and joint.settings == one.settings


def test_stream_of_findings_goes_one_after_the_other_and_stops_the_rest(present, image) -> None:
    indices = [index for index, _ in present.stream_findings(image, FINDINGS, order="scale")]
    assert indices == sorted(indices) and set(indices) == {0, 1, 2}
    seen: list[tuple[int, bool]] = []
    stop_after_first = lambda: any(finished for _, finished in seen)  # noqa: E731
    for index, update in present.stream_findings(image, FINDINGS, order="scale", should_stop=stop_after_first):
        seen.append((index, update.finished))
    assert {index for index, _ in seen} == {0} and seen[-1] == (0, True)  # Stop: the later findings never start


def test_bad_lists_of_findings_are_refused_before_any_work(present, image, monkeypatch) -> None:
    from napari_mris.findings import MAX_FINDINGS

    monkeypatch.setattr(pipeline_module, "prefill_image", lambda *a, **k: pytest.fail("decoded a bad list"))
    cases = [
        (["lower left lung", "Lower  left lung"], "Finding 2 repeats finding 1"),
        (["lower left lung", " ", "upper right lung"], "Finding 2 of 3 is empty"),
        ([f"finding {i}" for i in range(MAX_FINDINGS + 1)], f"more than the {MAX_FINDINGS}"),
        ([], "No finding"),
        (["lower left lung", "..."], "empty"),  # the tokenizer's check, still before any decoding
    ]
    for prompts, message in cases:
        with pytest.raises(PromptError, match=message):
            list(present.stream_findings(image, prompts))
