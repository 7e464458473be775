"""The referring benchmark: set construction on constructed masks, scoring with both references, real val data."""

from __future__ import annotations

import numpy as np
import pytest
from test_prompts import LOWER_LEFT, MIDDLE_RIGHT, SIZE, UPPER_LEFT, _mask  # the same constructed masks

from napari_mris_train.evaluate import format_table, summarise
from napari_mris_train.metrics import overlap_counts, pooled_dice_iou
from napari_mris_train.prompts import lesion_zones, parse_zones, zone_regions
from napari_mris_train.referring import (
    SETS,
    absent_kind,
    description_kind,
    image_prompts,
    other_description,
    referring_prompts,
    side_prompts,
    unambiguous_zones,
    zone_prompt,
)


def test_zone_regions_tile_each_side_and_hold_their_parts() -> None:
    mask = _mask(UPPER_LEFT, LOWER_LEFT, MIDDLE_RIGHT)
    regions = zone_regions(mask)
    assert [(z, p.sum()) for z, p in lesion_zones(mask)] == [(z, p.sum()) for z, p, _ in regions]
    for zone, part, region in regions:
        assert (part <= region).all()  # the truth lies inside its region
        assert not region[:, SIZE // 2 :].any() if zone.endswith("left") else not region[:, : SIZE // 2].any()
    left = [r for z, _, r in regions if z.endswith("left")]
    assert not (left[0] & left[1]).any()  # regions of one side are disjoint


def test_side_prompts_only_for_bilateral_masks() -> None:
    assert side_prompts(_mask(UPPER_LEFT, LOWER_LEFT)) == []
    left, right = side_prompts(_mask(UPPER_LEFT, LOWER_LEFT, MIDDLE_RIGHT))
    assert left.text == "Unilateral pulmonary infection, two infected areas, upper lower left lung."
    assert right.text == "Unilateral pulmonary infection, one infected area, middle right lung."
    assert np.array_equal(left.truth, _mask(UPPER_LEFT, LOWER_LEFT))
    assert np.array_equal(right.truth, _mask(MIDDLE_RIGHT))
    assert left.region[:, : SIZE // 2].all() and not left.region[:, SIZE // 2 :].any()  # the whole half
    assert set(parse_zones(left.text)) == {"upper left", "lower left"}


def test_zone_prompts_only_where_every_lesion_sits_in_one_zone() -> None:
    rng = np.random.default_rng(0)
    two_zones = _mask(UPPER_LEFT, LOWER_LEFT)
    assert [z for z, _, _ in unambiguous_zones(two_zones)] == ["upper left", "lower left"]
    prompt = zone_prompt(two_zones, rng)
    assert prompt.set == "zone" and parse_zones(prompt.text) in (["upper left"], ["lower left"])
    assert prompt.truth.sum() == _mask(UPPER_LEFT).sum() and (prompt.truth <= prompt.region).all()
    spanning = _mask((14, 64, 20, 35))  # one lesion over three levels: the level cut is arbitrary
    assert unambiguous_zones(spanning) == [] and zone_prompt(spanning, rng) is None
    assert zone_prompt(_mask(MIDDLE_RIGHT), rng) is None  # a single zone has no proper part


def test_referring_prompts_of_one_image() -> None:
    bilateral = _mask(UPPER_LEFT, LOWER_LEFT, MIDDLE_RIGHT)
    prompts = referring_prompts(bilateral, "own text", "other text", np.random.default_rng(1))
    assert [p.set for p in prompts] == ["full", "side", "side", "zone", "other"]  # no zone is empty enough
    assert prompts[-1].text == "other text" and np.array_equal(prompts[-1].truth, bilateral)
    unilateral = _mask(UPPER_LEFT, LOWER_LEFT)
    prompts = referring_prompts(unilateral, "own text", None, np.random.default_rng(1))
    assert [p.set for p in prompts] == ["full", "zone", "absent"]
    absent = prompts[-1]
    assert not absent.truth.any()
    named = parse_zones(absent.text)
    assert named and all(not part.any() for zone, part in lesion_zones(unilateral) if zone in named)
    again = referring_prompts(unilateral, "own text", None, np.random.default_rng(1))
    assert [p.text for p in again] == [p.text for p in prompts]  # a function of the seed
    assert [p.set for p in referring_prompts(bilateral, "t", None, np.random.default_rng(1), ("side",))] == ["side"] * 2
    with pytest.raises(ValueError, match="unknown"):
        referring_prompts(bilateral, "t", None, np.random.default_rng(1), ("sides",))


def test_absent_kind_says_whether_the_named_lung_is_lesion_free() -> None:
    unilateral = _mask(LOWER_LEFT)
    one = "Unilateral pulmonary infection, one infected area, {} lung."
    assert absent_kind(unilateral, one.format("lower right")) == "empty_lung"
    assert absent_kind(unilateral, one.format("upper left")) == "other_level"
    both = "Bilateral pulmonary infection, two infected areas, upper left lung and all right lung."
    assert absent_kind(unilateral, both) == "other_level"  # one named lung holds a lesion
    rngs = [np.random.default_rng(seed) for seed in range(40)]
    kinds = {(p.set, p.kind) for rng in rngs for p in referring_prompts(unilateral, "t", None, rng)}
    assert {kind for name, kind in kinds if name == "absent"} == {"empty_lung", "other_level"}  # both occur
    assert {name for name, _ in kinds} == {"full", "absent"} and ("full", "names_lesion") in kinds


def test_description_kind_says_whether_the_text_names_a_zone_with_lesions() -> None:
    """A full description whose named zones are all empty by the absent rule is what the absent set asks
    with an empty truth: its "not present" answers are counted apart."""
    lower_left = _mask(LOWER_LEFT)
    one = "Unilateral pulmonary infection, one infected area, {} lung."
    assert description_kind(lower_left, one.format("lower left")) == "names_lesion"
    assert description_kind(lower_left, one.format("upper right")) == "names_only_empty"
    assert description_kind(lower_left, one.format("upper left")) == "names_only_empty"  # same lung, far level
    both = "Bilateral pulmonary infection, two infected areas, lower left lung and upper right lung."
    assert description_kind(lower_left, both) == "names_lesion"  # one named zone holds the lesion
    assert description_kind(lower_left, "Pulmonary infection.") == "names_lesion"  # names no zone
    prompt = referring_prompts(lower_left, one.format("upper right"), None, np.random.default_rng(0))[0]
    assert (prompt.set, prompt.kind) == ("full", "names_only_empty")


def test_other_description_differs() -> None:
    texts = ["a", "A ", "b"]
    assert other_description(texts, 0, np.random.default_rng(0)) == "b"
    assert other_description(["same", "same"], 0, np.random.default_rng(0)) is None


def test_an_images_prompts_do_not_depend_on_the_other_sets_asked_for() -> None:
    """`presence` and checkpoint selection ask for fewer sets than `eval`: they must score the same prompts.
    (Before, leaving out `other` or `zone` shifted the random stream and so the absent prompt.)"""
    masks = [_mask(UPPER_LEFT, LOWER_LEFT), _mask(LOWER_LEFT), _mask(UPPER_LEFT, LOWER_LEFT, MIDDLE_RIGHT)]
    descriptions = ["first text", "second text", "third text", "fourth text"]
    for seed in range(12):
        for index, mask in enumerate(masks):
            every = image_prompts(descriptions, index, mask, seed)
            for subset in (("absent",), ("full", "side", "absent"), ("full", "side", "zone", "absent"), ("zone",)):
                asked = image_prompts(descriptions, index, mask, seed, subset)
                assert [(p.set, p.text) for p in asked] == [(p.set, p.text) for p in every if p.set in subset]
            assert every[-1].set == "other" and every[-1].text != descriptions[index]


def _row(set_name, prediction, truth, full=None, region=None, rejected=False):
    row = {
        "name": "x",
        "set": set_name,
        "dice": 0.0,
        "counts": overlap_counts(prediction, truth),
        "rejected": rejected,
        "not_present": rejected or not prediction.any(),
    }
    if region is not None:
        row["text_ignored_counts"] = overlap_counts(full, truth)
        row["oracle_counts"] = overlap_counts(full & region, truth)
    return row


def test_summary_reports_both_references_pooled_and_n_acc() -> None:
    mask = _mask(UPPER_LEFT, LOWER_LEFT, MIDDLE_RIGHT)
    left = side_prompts(mask)[0]
    empty = np.zeros_like(mask)
    rows = [
        _row("full", mask, mask) | {"kind": "names_lesion"},
        _row("full", empty, mask, rejected=True) | {"kind": "names_only_empty"},
        _row("side", left.truth, left.truth, full=mask, region=left.region),  # follows the text
        _row("side", mask, left.truth, full=mask, region=left.region),  # ignores it
        _row("absent", empty, empty, rejected=True) | {"kind": "empty_lung"},
        _row("absent", mask, empty) | {"kind": "other_level"},
    ]
    report = summarise(rows)
    assert report["sets"]["absent"]["by_kind"] == {
        "empty_lung": {"n": 1, "not_present": 1.0},
        "other_level": {"n": 1, "not_present": 0.0},
    }
    side = report["sets"]["side"]
    ignored = 2 * left.truth.sum() / (mask.sum() + left.truth.sum())
    assert side["dice"] == pytest.approx((1 + ignored) / 2)
    assert side["text_ignored"]["dice"] == pytest.approx(ignored) and side["oracle"]["dice"] == pytest.approx(1.0)
    assert side["of_oracle"] == pytest.approx(side["dice"])
    assert side["pooled_dice"] == pytest.approx(pooled_dice_iou([r["counts"] for r in rows[2:4]])[0])
    assert report["n_acc"] == 0.5 and report["false_rejection_rate"] == 0.5
    assert report["sets"]["full"]["by_kind"] == {
        "names_lesion": {"n": 1, "not_present": 0.0},
        "names_only_empty": {"n": 1, "not_present": 1.0},
    }
    assert report["selection"] == pytest.approx(np.mean([0.5, side["dice"], 0.5]))
    table = format_table({"n_images": 1, "order": "raster", "beam": 1, "snap": True, "seconds": 0.0, **report})
    assert "N-Acc (absent)" in table and "empty lung (n = 1)" in table and "names only empty (n = 1)" in table


def test_pooled_dice_weighs_pixels_not_images() -> None:
    small_miss, large_hit = (0, 10, 10), (1000, 1000, 1000)
    assert pooled_dice_iou([small_miss, large_hit]) == pytest.approx((2000 / 2020, 1000 / 1020))  # mean: 0.5
    assert pooled_dice_iou([(0, 0, 0)]) == (1.0, 1.0)


def test_sets_on_real_validation_masks(qata_root) -> None:
    """On 60 real val masks every set is built, and every restricted truth is a proper part of the mask."""
    from napari_mris_train.data import load_split, read_mask

    split = load_split(qata_root, split="val")
    counts = dict.fromkeys(SETS, 0)
    for index, (_, _, mask_path, text) in enumerate(split.pairs[:60]):
        mask = read_mask(mask_path)
        for prompt in referring_prompts(mask, text, "other", np.random.default_rng([0, index])):
            counts[prompt.set] += 1
            if prompt.set in ("side", "zone"):
                assert prompt.truth.any() and (prompt.truth <= mask).all() and prompt.truth.sum() < mask.sum()
            if prompt.set == "absent":
                assert not prompt.truth.any()
    assert counts["full"] == counts["other"] == 60
    assert min(counts.values()) > 0, counts
