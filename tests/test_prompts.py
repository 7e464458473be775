"""Training prompts: zone geometry, zone-restricted and absent-target prompts, left/right swapping."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mris.phantom import make_phantom
from napari_mris_train.prompts import (
    absent_target,
    describe,
    describe_mask,
    lesion_zones,
    level_bands,
    parse_zones,
    swap_left_right,
    zone_agreement,
    zone_restricted,
)

SIZE = 100  # level bands at this size: upper 12-30, middle 30-48, lower 48-66 (rows)


def _mask(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    for r0, r1, c0, c1 in boxes:
        mask[r0:r1, c0:c1] = True
    return mask


UPPER_LEFT = (14, 28, 20, 35)
LOWER_LEFT = (50, 64, 20, 35)
MIDDLE_RIGHT = (32, 46, 65, 80)


def test_level_bands() -> None:
    assert level_bands(SIZE) == [(12, 30), (30, 48), (48, 66)]


def test_lesion_zones_by_side_and_level() -> None:
    mask = _mask(UPPER_LEFT, LOWER_LEFT, MIDDLE_RIGHT)
    zones = lesion_zones(mask)
    assert [zone for zone, _ in zones] == ["upper left", "lower left", "middle right"]
    assert np.array_equal(zones[0][1], _mask(UPPER_LEFT))
    assert np.array_equal(zones[2][1], _mask(MIDDLE_RIGHT))
    assert np.array_equal(np.logical_or.reduce([part for _, part in zones]), mask)  # a partition of the mask
    assert describe_mask(mask) == (
        "Bilateral pulmonary infection, three infected areas, upper lower left lung and middle right lung."
    )


def test_large_lesion_spans_all_levels() -> None:
    mask = _mask((14, 70, 15, 40))
    assert [zone for zone, _ in lesion_zones(mask)] == ["upper left", "middle left", "lower left"]
    assert describe_mask(mask) == "Unilateral pulmonary infection, one infected area, all left lung."


def test_small_spill_over_the_midline_stays_with_its_side() -> None:
    mask = _mask((50, 64, 30, 52))  # 2 of its 22 columns lie right of the midline (9 %)
    assert [zone for zone, _ in lesion_zones(mask)] == ["lower left", "lower right"]
    mask = _mask((50, 64, 30, 51))  # 1 of 21 columns (4.8 % < 5 %): spill-over
    zones = lesion_zones(mask)
    assert [zone for zone, _ in zones] == ["lower left"] and zones[0][1].sum() == mask.sum()


def test_lesion_below_the_bands_is_lower_and_not_lost_next_to_a_big_one() -> None:
    mask = _mask((32, 46, 20, 35), (72, 78, 20, 30))  # a middle lesion and a small one under the lower band
    assert [zone for zone, _ in lesion_zones(mask)] == ["middle left", "lower left"]


def test_empty_mask() -> None:
    empty = np.zeros((SIZE, SIZE), bool)
    rng = np.random.default_rng(0)
    assert lesion_zones(empty) == [] and describe_mask(empty) is None
    assert zone_restricted(empty, rng) is None
    assert absent_target(empty, rng) is not None  # every zone is empty


def test_zone_restricted_targets_a_proper_part() -> None:
    mask = _mask(UPPER_LEFT, LOWER_LEFT, MIDDLE_RIGHT)
    allowed = {
        "Unilateral pulmonary infection, two infected areas, upper lower left lung.": _mask(UPPER_LEFT, LOWER_LEFT),
        "Unilateral pulmonary infection, one infected area, upper left lung.": _mask(UPPER_LEFT),
        "Unilateral pulmonary infection, one infected area, lower left lung.": _mask(LOWER_LEFT),
        "Unilateral pulmonary infection, one infected area, middle right lung.": _mask(MIDDLE_RIGHT),
    }
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        text, part = zone_restricted(mask, rng)
        assert text in allowed, text
        assert np.array_equal(part, allowed[text])
        seen.add(text)
    assert seen == set(allowed)  # every candidate is drawn


def test_zone_restricted_none_for_a_single_zone() -> None:
    assert zone_restricted(_mask(LOWER_LEFT), np.random.default_rng(0)) is None


def test_absent_target_names_only_empty_zones() -> None:
    # With the 8-row margin the zones count as empty in rows: upper 0-38, middle 22-56, lower 40-100.
    mask = _mask(LOWER_LEFT, (14, 28, 65, 80))  # lower left (rows 50-64) and upper right (rows 14-28)
    rng = np.random.default_rng(1)
    texts = {absent_target(mask, rng) for _ in range(200)}
    assert texts == {
        "Unilateral pulmonary infection, one infected area, upper left lung.",
        "Unilateral pulmonary infection, one infected area, lower right lung.",
        "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    }


def test_absent_target_none_when_every_zone_has_lesions() -> None:
    mask = _mask((5, 95, 10, 45), (5, 95, 55, 90))
    assert absent_target(mask, np.random.default_rng(0)) is None


def test_absent_target_whole_empty_side_can_read_all() -> None:
    mask = _mask(MIDDLE_RIGHT)  # rows 32-46 reach into the margins of the right upper and lower zones
    texts = {absent_target(mask, np.random.default_rng(seed)) for seed in range(100)}
    assert "Unilateral pulmonary infection, one infected area, all left lung." in texts
    assert all(zone.endswith("left") for text in texts for zone in parse_zones(text))


@pytest.mark.parametrize(
    ("text", "swapped"),
    [
        (
            "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung.",
            "Bilateral pulmonary infection, two infected areas, all right lung and lower left lung.",
        ),
        ("Left lower lobe; RIGHT apex; leftover", "Right lower lobe; LEFT apex; leftover"),
    ],
)
def test_swap_left_right(text: str, swapped: str) -> None:
    assert swap_left_right(text) == swapped
    assert swap_left_right(swapped) == text


def test_parse_zones() -> None:
    assert parse_zones("Bilateral pulmonary infection,two infected areas,all left and all right lung.") == [
        "upper left",
        "middle left",
        "lower left",
        "upper right",
        "middle right",
        "lower right",
    ]
    assert parse_zones("Unilateral pulmonary infection, one infected area, middle lower right lung.") == [
        "middle right",
        "lower right",
    ]


def test_describe_round_trip_through_parse() -> None:
    zones = ["upper left", "lower left", "middle right"]
    assert parse_zones(describe(zones, 3)) == zones


def test_phantom_descriptions_agree_with_the_geometry() -> None:
    pairs = [(p.mask, p.description) for p in (make_phantom(seed, size=48) for seed in range(40))]
    assert zone_agreement(pairs) == {"pairs": 40, "sides": 100.0, "zones": 100.0, "areas": 100.0}


def test_flipped_mask_matches_swapped_text() -> None:
    phantom = make_phantom(4, size=64, zones=["upper left", "lower right"])
    flipped = describe_mask(phantom.mask[:, ::-1])
    assert parse_zones(flipped) == ["lower left", "upper right"]
    assert set(parse_zones(swap_left_right(phantom.description))) == set(parse_zones(flipped))
