"""Training prompts that force the model to read the text.

QaTa-COV19 has one description per image and it always describes the whole mask, so a model can reach a
good Dice while ignoring the text. Two kinds of extra prompts break that shortcut:

- zone-restricted: a description of only one side or one zone of the lesions, whose target is the
  matching part of the mask;
- absent-target: a description naming only lung zones where the mask is empty, whose answer is `[REJ]`.

And any prompt can be put into a radiologist's sentence (`reword`, `train.wording_fraction`): the
templates alone taught a model that read them by position, not by their words (docs/results.md, "Free
wording").

Zone geometry (shared with `napari_mris.phantom`, so phantom descriptions and these agree):

- side: the image's vertical midline; "left" is the viewer's left (the QaTa-COV19 convention). Pixels
  on a side holding under `MIN_SIDE_FRACTION` of the mask (a lesion crossing the midline) count for the
  other side.
- level: rows `ZONE_TOP`..`ZONE_BOTTOM` of the image are cut in thirds (upper, middle, lower; rows above
  and below belong to the upper and lower zone). A side's lesions are in a level when they touch at least
  `ZONE_COVERAGE` of that third's rows; an area whose rows meet no named level adds its centroid's level.
- areas: 8-connected components of the mask.

Measured against the real descriptions with `python -m napari_mris_train.prompts ROOT --split NAME`
(the constants were chosen on 1,500 training pairs; val was not used): QaTa-COV19 train (5,716 pairs)
sides 98.1 %, full zone list 56.3 %, area count 96.9 %; val (1,429 pairs) 97.7 %, 46.5 %, 98.4 %. The
zone list agrees less because annotators use "lower" and "middle" loosely (val's annotators call many
lesions "middle" that train's would call "lower").
"""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage as ndi

from napari_mris.phantom import LEVELS, SIDES, ZONE_BOTTOM, ZONE_TOP, count_areas, number_word, split_zone
from napari_mris.phantom import describe as _describe

ZONE_COVERAGE = 0.4  # fraction of a third's rows a side's lesions must touch for that level to be named
MIN_SIDE_FRACTION = 0.05  # a side with less of the mask than this is spill-over from the other side
ABSENT_MARGIN = 0.08  # an absent zone must be empty this far (fraction of the height) beyond its rows too
_ZONE_WORDS = re.compile(r"((?:(?:upper|middle|lower|all)\s+)+)(left|right)\b", re.IGNORECASE)
_SIDE_WORD = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def describe(zones: list[str], n_areas: int) -> str:
    """LViT-style text, e.g. 'Unilateral pulmonary infection, one infected area, upper right lung.'"""
    return _describe(zones, n_areas)


def level_bands(height: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the upper, middle and lower thirds used to name levels."""
    edges = np.round(np.linspace(ZONE_TOP, ZONE_BOTTOM, len(LEVELS) + 1) * height).astype(int)
    return [(int(edges[k]), int(edges[k + 1])) for k in range(len(LEVELS))]


def side_masks(mask: np.ndarray) -> dict[str, np.ndarray]:
    """The mask split at the vertical midline into its 'left' and 'right' (viewer's) parts; spill-over merged."""
    mask = np.asarray(mask, bool)
    middle = mask.shape[1] // 2
    parts = {side: np.zeros_like(mask) for side in SIDES}
    parts["left"][:, :middle] = mask[:, :middle]
    parts["right"][:, middle:] = mask[:, middle:]
    total = int(mask.sum())
    for side, other in (("left", "right"), ("right", "left")):
        if 0 < parts[side].sum() < MIN_SIDE_FRACTION * total:
            parts[other] |= parts[side]
            parts[side][:] = False
    return {side: part for side, part in parts.items() if part.any()}


def _side_levels(part: np.ndarray) -> list[str]:
    """Levels a side's lesions are named by.

    A level is named when the side's lesions touch at least ZONE_COVERAGE of its rows; an area (connected
    component) whose rows meet no named level adds the level nearest its centroid, so a small lesion
    below a large one is not lost.
    """
    rows = part.any(axis=1)
    bands = level_bands(part.shape[0])
    named = {k for k, (a, b) in enumerate(bands) if b > a and rows[a:b].mean() >= ZONE_COVERAGE}
    labels, count = ndi.label(part, structure=np.ones((3, 3), bool))
    for index in range(1, count + 1):
        area_rows = np.flatnonzero((labels == index).any(axis=1))
        if not any(a <= area_rows[-1] and area_rows[0] < b for a, b in (bands[k] for k in named)):
            centroid = float(np.average(area_rows, weights=(labels == index).sum(axis=1)[area_rows]))
            named.add(_nearest_band(centroid, bands))
    return [LEVELS[k] for k in sorted(named)]


def _nearest_band(row: float, bands: list[tuple[int, int]], allowed: list[int] | None = None) -> int:
    allowed = list(range(len(bands))) if allowed is None else allowed
    return min(allowed, key=lambda k: max(bands[k][0] - row, row - (bands[k][1] - 1), 0.0))


def lesion_zones(mask: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The mask cut into named zones: [(zone, part)], parts disjoint and together the whole mask.

    Zones come left side first, upper to lower. Each row of a side goes to the nearest named level, so
    a lesion reaching a little into a neighbouring third stays with the level it is named by.
    """
    return [(zone, part) for zone, part, _ in zone_regions(mask)]


def zone_regions(mask: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """`lesion_zones` with each zone's territory: [(zone, part, region)], `part = mask & region`.

    The region of a zone is its side's half of the image (split at the midline) restricted to the rows
    that go to its level; a side's regions tile that half. The referring benchmark cuts a predicted mask
    to a region for its oracle reference.
    """
    zones = []
    height, width = np.shape(mask)
    for side, part in side_masks(mask).items():
        levels = _side_levels(part)
        bands = level_bands(height)
        named = [LEVELS.index(level) for level in levels]
        row_level = np.array([_nearest_band(r, bands, named) for r in range(height)])
        columns = np.zeros(width, bool)
        columns[: width // 2] = side == "left"
        columns[width // 2 :] = side == "right"
        for k in named:
            region = (row_level == k)[:, None] & columns[None, :]
            zone_part = part & (row_level == k)[:, None]
            if zone_part.any():
                zones.append((f"{LEVELS[k]} {side}", zone_part, region | zone_part))
    return zones


def describe_mask(mask: np.ndarray) -> str | None:
    """The LViT-style description of a whole mask (None for an empty mask)."""
    zones = lesion_zones(mask)
    if not zones:
        return None
    return describe([zone for zone, _ in zones], count_areas(mask))


def zone_restricted(mask: np.ndarray, rng: np.random.Generator) -> tuple[str, np.ndarray] | None:
    """A description of one side or one zone of the lesions and that part of the mask.

    Only proper parts are offered (a unilateral single-zone mask has none: returns None), so the prompt
    always names less than the whole finding.
    """
    mask = np.asarray(mask, bool)
    zones = lesion_zones(mask)
    candidates: list[tuple[list[str], np.ndarray]] = []
    for side in SIDES:
        on_side = [(zone, part) for zone, part in zones if zone.endswith(side)]
        if on_side:
            candidates.append(([zone for zone, _ in on_side], np.logical_or.reduce([p for _, p in on_side])))
        if len(on_side) > 1:
            candidates.extend(([zone], part) for zone, part in on_side)
    total = int(mask.sum())
    candidates = [(names, part) for names, part in candidates if int(part.sum()) < total]
    if not candidates:
        return None
    names, part = candidates[int(rng.integers(len(candidates)))]
    return describe(names, count_areas(part)), part


def side_columns(width: int) -> dict[str, slice]:
    """The columns of each side's half of the image, split at the midline (no spill-over merged)."""
    return {"left": slice(0, width // 2), "right": slice(width // 2, width)}


def empty_zones(mask: np.ndarray) -> dict[str, list[str]]:
    """{side: [level, ...]} of the zones with no mask pixel on their side within their rows widened by
    ABSENT_MARGIN (the upper zone up to the top edge, the lower one down to the bottom edge): the zones an
    absent prompt may name (`absent_target`)."""
    mask = np.asarray(mask, bool)
    height, width = mask.shape
    margin = int(round(ABSENT_MARGIN * height))
    bands = level_bands(height)
    empty: dict[str, list[str]] = {}
    for side, columns in side_columns(width).items():
        for k, level in enumerate(LEVELS):
            start = 0 if k == 0 else max(bands[k][0] - margin, 0)
            stop = height if k == len(LEVELS) - 1 else bands[k][1] + margin
            if not mask[start:stop, columns].any():
                empty.setdefault(side, []).append(level)
    return empty


def absent_target(mask: np.ndarray, rng: np.random.Generator) -> str | None:
    """A description naming only zones where the mask is empty (answer: `[REJ]`), or None if there are none.

    Empty means `empty_zones`, whose margin allows for annotators placing levels loosely (the margin's
    trade-off, descriptions naming a zone it calls empty against masks that offer one: docs/training.md).
    """
    empty = empty_zones(mask)
    if not empty:
        return None
    sides = list(empty)
    bilateral = len(sides) == 2 and rng.random() < 0.25  # sometimes a bilateral absent finding
    chosen = sides if bilateral else [sides[int(rng.integers(len(sides)))]]
    zones = []
    for side in chosen:
        run = _random_run(empty[side], rng)
        zones.extend(f"{level} {side}" for level in run)
    return describe(zones, len(chosen))


# The sentences `reword` puts a training prompt into: a report's opening and a closing remark, each often
# left out. None is one of the wordings docs/results.md measures free wording with, which stay unseen.
WORDING_OPENINGS = (
    "Findings: ",
    "Impression: ",
    "Frontal radiograph. ",
    "AP portable chest film: ",
    "PA view of the chest. ",
    "Known COVID-19 patient. ",
    "History of fever and cough. ",
    "Compared with the prior study, ",
    "The radiograph shows ",
    "There is ",
    "Airspace disease: ",
    "Patchy consolidation, ",
    "Hazy opacity: ",
    "Please segment the ",
)
WORDING_CLOSINGS = (
    " No pleural effusion.",
    " Heart size is normal.",
    " Likely infection.",
    " Recommend follow-up imaging.",
    " Worse than before.",
    " Improving since the last film.",
    " No pneumothorax.",
    " Atypical pattern.",
    " Lines and tubes unchanged.",
)


def reword(text: str, rng: np.random.Generator) -> str:
    """`text` inside a random sentence: an opening, a closing or both from the lists above (never neither)."""
    opening, closing = "", ""
    while not opening and not closing:
        opening = WORDING_OPENINGS[int(rng.integers(len(WORDING_OPENINGS)))] if rng.random() < 0.7 else ""
        closing = WORDING_CLOSINGS[int(rng.integers(len(WORDING_CLOSINGS)))] if rng.random() < 0.6 else ""
    return f"{opening}{text}{closing}"


def _random_run(levels: list[str], rng: np.random.Generator) -> list[str]:
    """A random run of consecutive levels among `levels` (e.g. ['middle', 'lower'] or ['upper'])."""
    runs: list[list[str]] = []
    for level in LEVELS:
        if level in levels and runs and LEVELS.index(runs[-1][-1]) == LEVELS.index(level) - 1:
            runs[-1].append(level)
        elif level in levels:
            runs.append([level])
    run = runs[int(rng.integers(len(runs)))]
    start = int(rng.integers(len(run)))
    stop = int(rng.integers(start, len(run))) + 1
    return run[start:stop]


def parse_zones(text: str) -> list[str]:
    """Zones named in an LViT-style description ('all left lung' -> three zones), left side first."""
    found = set()
    for words, side in _ZONE_WORDS.findall(text):
        levels = LEVELS if "all" in words.lower().split() else words.lower().split()
        found.update(f"{level} {side.lower()}" for level in levels)
    return [zone for zone in (f"{lv} {sd}" for sd in SIDES for lv in LEVELS) if zone in found]


def swap_left_right(text: str) -> str:
    """Exchange 'left' and 'right' (keeping letter case), for horizontal-flip augmentation."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _SIDE_WORD.sub(swap, text)


def zone_agreement(masks_and_texts) -> dict[str, float]:
    """How often the geometry above reproduces real descriptions: sides, full zone list, area count (%)."""
    sides = zones = areas = total = 0
    for mask, text in masks_and_texts:
        named = parse_zones(text)
        found = [zone for zone, _ in lesion_zones(mask)]
        sides += {z.split()[1] for z in named} == {z.split()[1] for z in found}
        zones += set(named) == set(found)
        match = re.search(r"(\w+)\s+infected\s+areas?", text)
        areas += bool(match) and match.group(1).lower() == number_word(count_areas(mask))
        total += 1
    return {"pairs": total} | {
        key: round(100.0 * value / max(total, 1), 1)
        for key, value in (("sides", sides), ("zones", zones), ("areas", areas))
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m napari_mris_train.prompts ROOT --split val`: print the zone agreement of a split."""
    import argparse
    import json

    from napari_mris_train.data import load_split, read_mask

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", help="an LViT dataset root or split folder")
    parser.add_argument("--split", default=None, help="train, val or test (omit when ROOT is a split folder)")
    args = parser.parse_args(argv)
    split = load_split(args.root, split=args.split)
    result = zone_agreement((read_mask(mask_path), text) for _, _, mask_path, text in split.pairs)
    print(json.dumps({"split": str(split.folder)} | result))
    return 0


__all__ = [
    "absent_target",
    "describe",
    "describe_mask",
    "lesion_zones",
    "level_bands",
    "parse_zones",
    "side_columns",
    "side_masks",
    "split_zone",
    "swap_left_right",
    "zone_agreement",
    "zone_regions",
    "zone_restricted",
]

if __name__ == "__main__":
    raise SystemExit(main())
