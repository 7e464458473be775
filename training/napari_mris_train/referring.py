"""The referring sets: prompts built from a split's own masks, each with the truth it should produce.

On QaTa-COV19 every description covers the whole mask, so Dice on the images' own descriptions rewards a
model that ignores the text. These sets ask narrower questions of the same images (issue 15):

- `full`: the image's own description; truth = the whole mask;
- `side`: bilateral cases only, a description of one side's zones; truth = that side's lesions (one
  prompt per side);
- `zone`: one zone (upper / middle / lower of a side) of a side that has several, only where the split is
  unambiguous: every lesion of that side lies inside one zone; truth = that zone's lesions;
- `absent`: a description naming only zones with no lesion (`prompts.absent_target`); truth = empty;
- `other`: another image's description; truth = this image's whole mask (how much does the text matter?).

`side` and `zone` prompts carry the named zone's `region` (its side of the image, its rows), so a
benchmark can score two references beside the model: *text ignored* (the full-description mask against
the restricted truth) and *oracle* (that mask cut to the region). Zone geometry is `prompts.py`'s.
Everything is a function of (mask, description, rng): the same seed gives the same sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_mris.phantom import SIDES, count_areas
from napari_mris_train.prompts import (
    absent_target,
    describe,
    empty_zones,
    parse_zones,
    side_columns,
    zone_regions,
)

SETS = ("full", "side", "zone", "absent", "other")
RESTRICTED = ("side", "zone")  # the sets scored against a part of the mask, with both references
# An absent prompt names a lung with no lesion at all, or the wrong level of a lung that has one.
ABSENT_KINDS = ("empty_lung", "other_level")
# A full description names a zone that holds lesions, or only zones that `absent_target`'s rule calls empty
# (the annotator's words and mask disagree: the absent set would ask that text with an empty truth).
FULL_KINDS = ("names_lesion", "names_only_empty")
KINDS = {"full": FULL_KINDS, "absent": ABSENT_KINDS}
OTHER_TRIES = 32


@dataclass(frozen=True)
class ReferringPrompt:
    set: str  # one of SETS
    text: str
    truth: np.ndarray  # bool (H, W): what the answer should be
    region: np.ndarray | None = None  # bool (H, W): the named part of the image (side and zone sets)
    kind: str | None = None  # full and absent sets: KINDS[set], which says what the answer should rest on


def side_prompts(mask: np.ndarray) -> list[ReferringPrompt]:
    """One prompt per side of a bilateral mask, naming that side's zones; [] for a unilateral mask."""
    zones = zone_regions(np.asarray(mask, bool))
    prompts = []
    for side in SIDES:
        on_side = [(name, part, region) for name, part, region in zones if name.endswith(side)]
        if not on_side:
            return []
        truth = np.logical_or.reduce([part for _, part, _ in on_side])
        region = np.logical_or.reduce([region for _, _, region in on_side])
        prompts.append(ReferringPrompt("side", describe([n for n, _, _ in on_side], count_areas(truth)), truth, region))
    return prompts


def unambiguous_zones(mask: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Zones of sides with two or more zones whose every lesion lies inside one zone: [(zone, part, region)].

    A lesion that the level rows cut in two would make "the middle left lesion" a matter of where the cut
    falls, not of reading the text; such sides are left out.
    """
    mask = np.asarray(mask, bool)
    zones = zone_regions(mask)
    chosen = []
    for side in SIDES:
        on_side = [z for z in zones if z[0].endswith(side)]
        if len(on_side) < 2:
            continue
        side_mask = np.logical_or.reduce([part for _, part, _ in on_side])
        labels, count = ndi.label(side_mask, structure=np.ones((3, 3), bool))
        zone_of = np.zeros(side_mask.shape, int)
        for k, (_, part, _) in enumerate(on_side, start=1):
            zone_of[part] = k
        if all(len(np.unique(zone_of[labels == lesion])) == 1 for lesion in range(1, count + 1)):
            chosen.extend(on_side)
    return chosen


def zone_prompt(mask: np.ndarray, rng: np.random.Generator) -> ReferringPrompt | None:
    """A prompt naming one unambiguous zone (drawn with `rng`), or None when the mask has none."""
    candidates = unambiguous_zones(mask)
    if not candidates:
        return None
    name, part, region = candidates[int(rng.integers(len(candidates)))]
    return ReferringPrompt("zone", describe([name], count_areas(part)), part, region)


def other_description(descriptions: list[str], index: int, rng: np.random.Generator) -> str | None:
    """A description of another image that differs from this one's text (templates repeat a lot)."""
    for _ in range(OTHER_TRIES):
        j = int(rng.integers(len(descriptions)))
        if j != index and descriptions[j].strip().lower() != descriptions[index].strip().lower():
            return descriptions[j]
    return None


def absent_kind(mask: np.ndarray, text: str) -> str:
    """'empty_lung' when no side the absent prompt names holds a mask pixel (absent_target's halves), else
    'other_level': the two are different skills, and a model can have one without the other."""
    columns = side_columns(mask.shape[1])
    sides = {zone.split()[1] for zone in parse_zones(text)}
    return "other_level" if any(mask[:, columns[side]].any() for side in sides) else "empty_lung"


def description_kind(mask: np.ndarray, text: str) -> str:
    """'names_only_empty' when every zone `text` names is empty by the absent rule (`empty_zones`), else
    'names_lesion' (also a text that names no zone). A model that reads levels strictly may well answer
    the first "not present": the false-rejection rate is reported for both kinds."""
    named = set(parse_zones(text))
    empty = {f"{level} {side}" for side, levels in empty_zones(mask).items() for level in levels}
    return "names_only_empty" if named and named <= empty else "names_lesion"


def referring_prompts(
    mask: np.ndarray,
    description: str,
    other: str | None,
    rng: np.random.Generator,
    sets: tuple[str, ...] = SETS,
) -> list[ReferringPrompt]:
    """The prompts of one image for the requested `sets`, in SETS order (`full` first when asked for).

    The zone and the absent prompt are drawn from `rng` whatever `sets` asks for, so an image's prompt of
    one set does not depend on which other sets were requested (the presence calibration and checkpoint
    selection ask for fewer sets than `eval` and must score the same prompts).
    """
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise ValueError(f"unknown referring sets {unknown}; known: {list(SETS)}")
    mask = np.asarray(mask, bool)
    zone = zone_prompt(mask, rng)
    absent = absent_target(mask, rng)
    prompts: list[ReferringPrompt] = []
    if "full" in sets:
        prompts.append(ReferringPrompt("full", description, mask, kind=description_kind(mask, description)))
    if "side" in sets:
        prompts.extend(side_prompts(mask))
    if "zone" in sets and zone is not None:
        prompts.append(zone)
    if "absent" in sets and absent is not None:
        prompts.append(ReferringPrompt("absent", absent, np.zeros_like(mask), kind=absent_kind(mask, absent)))
    if "other" in sets and other is not None:
        prompts.append(ReferringPrompt("other", other, mask))
    return prompts


def image_prompts(
    descriptions: list[str], index: int, mask: np.ndarray, seed: int, sets: tuple[str, ...] = SETS
) -> list[ReferringPrompt]:
    """The referring prompts of image `index` of a split with these `descriptions`, for `seed`.

    One random stream per (seed, image), so a `--limit` run is a prefix of the whole run; another image's
    description is drawn first whether or not `other` is asked for (see `referring_prompts`).
    """
    rng = np.random.default_rng([seed, index])
    other = other_description(descriptions, index, rng)
    return referring_prompts(mask, descriptions[index], other, rng, sets)
