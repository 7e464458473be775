"""Golden tests of the shipped default model: a worse model fails them.

The floors are the shipped model's measured figures (docs/results.md) less a margin for the platform's
floating-point noise; they move only when a retrained model is shipped on purpose. They cover what the
product promises: the labelled sample cases (a full description, one side of a bilateral finding, an empty
zone answered "not present") and, with the real data beside the repository, 32 validation images scored
by the referring benchmark (full descriptions, one-side prompts, absent prompts).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from napari_mris.io import read_slice
from napari_mris.pipeline import MRISPipeline

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"
MODEL_ID = "default-qata-v9"
# Dice floor per labelled sample case (its own prompt, the model's default order), measured for
# default-qata-v9 (0.914, 0.864, 0.809, 0.903, 0.924) less about 0.05.
SAMPLE_DICE_FLOORS = {
    "phantom_07": 0.86,
    "phantom_07_left": 0.81,
    "phantom_07_right": 0.76,
    "phantom_11": 0.85,
    "phantom_13": 0.87,
}
# The referring benchmark on the first 32 Val_Folder images (raster), measured for v9: full 78.32 %, side
# 81.40 %, N-Acc 71.43 % (15 of 21 absent prompts); floors about 3 points lower (N-Acc: two prompts).
VAL32_FLOORS = {"full": 0.75, "side": 0.78, "n_acc": 0.61}
# What v9 does not do on the phantoms (docs/results.md, issue 15). Its wording pass draws phantom_07's left
# side on that side alone (v8 spilled 1,189 px onto the right), but phantom_07's right side still spills onto
# the left, its empty zone now gets a mask (v8 said "not present"; p([REJ]) 0.43 against 0.50), and
# phantom_13's empty lung still gets one.
# Strict: a model that starts doing these makes the tests "pass unexpectedly", so they move into the floors.
KNOWN_MISSES = {  # (test, case) -> what the model does instead
    ("side", "phantom_07_right"): "draws 377 px on the other side too",
    ("absent", "phantom_07_absent"): "draws a mask for the empty zone (445 px)",
    ("absent", "phantom_13_absent"): "draws a mask for the empty lung (1,056 px)",
}


def cases(test: str, selected: list[tuple[str, str]]) -> list:
    """pytest parameters of sample cases for `test`; its known misses marked strict xfail with the reason."""
    params = []
    for name, prompt in selected:
        miss = KNOWN_MISSES.get((test, name))
        marks = [pytest.mark.xfail(strict=True, reason=f"{MODEL_ID}: {miss}")] if miss else []
        params.append(pytest.param(name, prompt, id=name, marks=marks))
    return params


@pytest.fixture(scope="module")
def pipeline() -> MRISPipeline:
    pipeline = MRISPipeline.from_pretrained("default", device="cpu")
    assert pipeline.model_id == MODEL_ID, "a new shipped model needs its own measured floors here"
    return pipeline


def sample_cases() -> list[tuple[str, str]]:
    """(case name, prompt) of every labelled sample case."""
    with open(SAMPLES / "sample_text.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [(row["Image"].removeprefix("mask_").removesuffix(".png"), row["Description"]) for row in rows]


def segment_case(pipeline, name: str, prompt: str):
    image = read_slice(SAMPLES / "img" / f"{name}.png", expect_2d=True)
    truth = read_slice(SAMPLES / "labelcol" / f"mask_{name}.png", expect_2d=True).pixels > 0
    return pipeline.segment(image.pixels, prompt, window=image.window), truth


PRESENT = [(n, t) for n, t in sample_cases() if not n.endswith("_absent")]
ABSENT = [(n, t) for n, t in sample_cases() if n.endswith("_absent")]
ONE_SIDE = [(n, t) for n, t in sample_cases() if n.endswith(("_left", "_right"))]


@pytest.mark.parametrize("name,prompt", cases("dice", PRESENT))
def test_labelled_sample_case_dice(pipeline, name, prompt) -> None:
    from napari_mris_train.metrics import dice_iou

    result, truth = segment_case(pipeline, name, prompt)
    assert not result.not_present, f"{name}: answered not present (p([REJ]) {result.reject_probability:.2f})"
    dice = dice_iou(result.mask, truth)[0]
    assert dice >= SAMPLE_DICE_FLOORS[name], f"{name}: Dice {dice:.3f} under the floor {SAMPLE_DICE_FLOORS[name]}"


@pytest.mark.parametrize("name,prompt", cases("side", ONE_SIDE))
def test_one_side_prompt_draws_on_that_side_only(pipeline, name, prompt) -> None:
    result, truth = segment_case(pipeline, name, prompt)
    assert not result.not_present, f"{name}: answered not present for a side with lesions"
    width = truth.shape[1]
    other_half = np.s_[:, width // 2 :] if name.endswith("_left") else np.s_[:, : width // 2]
    assert not result.mask[other_half].any(), f"{name}: pixels drawn on the side the prompt did not name"


@pytest.mark.parametrize("name,prompt", cases("absent", ABSENT))
def test_absent_zone_is_not_present(pipeline, name, prompt) -> None:
    result, truth = segment_case(pipeline, name, prompt)
    assert not truth.any()
    assert result.not_present, f"{name}: {int(result.mask.sum())} pixels drawn for an empty zone"


def test_referring_benchmark_on_32_validation_images(pipeline, qata_root) -> None:
    from napari_mris_train.data import load_split
    from napari_mris_train.evaluate import evaluate_split

    split = load_split(qata_root, split="val")
    report = evaluate_split(pipeline, split, order="raster", limit=32, sets=("full", "side", "absent"), progress=False)
    figures = {"full": report["dice"], "side": report["sets"]["side"]["dice"], "n_acc": report["n_acc"]}
    below = {k: round(v, 4) for k, v in figures.items() if v < VAL32_FLOORS[k]}
    assert not below, f"under the floors {VAL32_FLOORS}: {below}"
