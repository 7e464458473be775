"""Synthetic chest X-ray phantoms with zone-named infected areas and LViT-style descriptions.

A phantom is a frontal chest radiograph drawn from a few smooth shapes (body, lungs, heart, spine and
mediastinum, ribs, clavicles, diaphragm) plus hazy ground-glass blobs placed in named lung zones. It lets
the sample data, the demo and the tests of every part of the project run without real patient images,
and, because the zone of each lesion is known, it exercises prompts that refer to only some lesions.

Geometry (fractions of the image size, shared with the training prompt construction):

- "left" / "right" are the image's left and right as the viewer sees them (the QaTa-COV19 text
  convention), split at the vertical midline;
- upper / middle / lower are thirds of the rows `ZONE_TOP`..`ZONE_BOTTOM`; the lower zone reaches on down to
  the diaphragm. These fractions were fitted to the QaTa-COV19 training descriptions (see docs/data.md):
  the annotators' "lower lung" starts higher than a geometric third of the lung field would.

Drawing needs only numpy and scipy.ndimage (installed with scikit-image), so the runtime can make a
phantom without the repository; PNGs are written with scikit-image, tables with openpyxl or csv.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

LEVELS = ("upper", "middle", "lower")
SIDES = ("left", "right")
ZONES = tuple(f"{level} {side}" for side in SIDES for level in LEVELS)
LUNG_TOP = 0.12  # fraction of the image height where the lung apices start
LUNG_BOTTOM = 0.74  # fraction where the diaphragm domes end the lung fields (lateral costophrenic angles)
ZONE_TOP = 0.12  # the upper / middle / lower thirds span these rows (fractions of the image height)
ZONE_BOTTOM = 0.66
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass
class Lesion:
    zone: str  # one of ZONES, e.g. "lower left"
    mask: np.ndarray  # bool (size, size)


@dataclass
class Phantom:
    image: np.ndarray  # uint8 (size, size)
    mask: np.ndarray  # bool (size, size): union of the lesion masks
    description: str
    lesions: list[Lesion]


# ----------------------------------------------------------------------------- text


def split_zone(zone: str) -> tuple[str, str]:
    """'lower left' -> ('lower', 'left'); raises ValueError on anything that is not one of ZONES."""
    words = zone.lower().split()
    if len(words) != 2 or words[0] not in LEVELS or words[1] not in SIDES:
        raise ValueError(f"unknown lung zone {zone!r}: expected one of {', '.join(ZONES)}")
    return words[0], words[1]


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def count_areas(mask: np.ndarray) -> int:
    """Infected areas = 8-connected components; matches the count in 97-98 % of QaTa-COV19 descriptions."""
    return int(ndi.label(mask, structure=np.ones((3, 3), bool))[1])


def describe(zones: list[str], n_areas: int) -> str:
    """LViT-style text: 'Bilateral pulmonary infection, two infected areas, all left lung and lower right lung.'

    Zones are grouped per side (left first), levels in upper/middle/lower order, and a side with all
    three levels reads "all left lung", the wording QaTa-COV19 uses most.
    """
    if n_areas < 1:
        raise ValueError(f"an infection description needs at least one infected area, got {n_areas}")
    levels_by_side: dict[str, list[str]] = {side: [] for side in SIDES}
    for zone in zones:
        level, side = split_zone(zone)
        if level not in levels_by_side[side]:
            levels_by_side[side].append(level)
    parts = []
    for side in SIDES:
        levels = [level for level in LEVELS if level in levels_by_side[side]]
        if levels:
            where = "all" if len(levels) == len(LEVELS) else " ".join(levels)
            parts.append(f"{where} {side} lung")
    if not parts:
        raise ValueError("an infection description needs at least one zone")
    laterality = "Bilateral" if len(parts) == 2 else "Unilateral"
    areas = f"{number_word(n_areas)} infected area" + ("s" if n_areas > 1 else "")
    return f"{laterality} pulmonary infection, {areas}, {' and '.join(parts)}."


# ----------------------------------------------------------------------------- anatomy


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (row, column) coordinates in [0, 1), pixel centres."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coords[:, None], coords[None, :]


def _smooth_noise(rng: np.random.Generator, size: int, sigma_frac: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (texture, blob shapes)."""
    field = ndi.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), max(sigma_frac * size, 0.5))
    return field / (field.std() + 1e-6)


def lung_fields(size: int, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Bool mask of both lung fields: narrow apices, convex lateral walls, diaphragm domes, heart cut out."""
    v, u = _grid(size)
    dx, dy = shift
    t = (v - LUNG_TOP - dy) / (LUNG_BOTTOM - LUNG_TOP)  # 0 at the apices, 1 at the costophrenic angles
    tc = np.clip(t, 0.0, 1.0)
    lateral = 0.175 * np.sin(np.pi / 2 * np.minimum(tc / 0.75, 1.0)) ** 0.5  # widest in the lower third
    medial = 0.14 + 0.025 * tc  # the medial wall, short of the mediastinum
    lungs = np.zeros((size, size), bool)
    for side in (-1.0, 1.0):  # -1: the image's left lung, +1: the image's right lung
        centre = 0.5 + dx + side * 0.2
        across = (u - centre) * side  # > 0 towards the flank
        dome = 0.07 * np.clip(1 - ((u - centre + side * 0.03) / 0.16) ** 2, 0, 1)  # diaphragm rises medially
        lungs |= (t > 0) & (t < 1 - dome / (LUNG_BOTTOM - LUNG_TOP)) & (across < lateral) & (across > -medial)
    return lungs & ~_heart(size, shift) & (np.abs(u - 0.5 - dx) > 0.06)


def _heart(size: int, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The cardiac silhouette: an ellipse leaning towards the viewer's right (patient's left)."""
    v, u = _grid(size)
    du, dv = u - 0.545 - shift[0], v - 0.6 - shift[1]
    a, b = du * 0.94 + dv * 0.34, -du * 0.34 + dv * 0.94  # rotated ~20 degrees
    return (a / 0.15) ** 2 + (b / 0.115) ** 2 < 1.0


def _anatomy(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Float image in [0, 1] of the chest without lesions, and its lung mask."""
    v, u = _grid(size)
    shift = (float(rng.uniform(-0.015, 0.015)), float(rng.uniform(-0.015, 0.015)))
    dx, dy = shift
    lateral = np.abs(u - 0.5 - dx)
    body = 1.0 / (1.0 + np.exp((lateral - 0.43 - 0.04 * v) / 0.015))  # trunk, widening slightly downwards
    neck = 1.0 / (1.0 + np.exp((lateral - 0.09) / 0.01)) * (v < 0.1)
    arms = 0.6 * np.exp(-(((lateral - 0.47) / 0.035) ** 2)) * (v < 0.45)
    image = 0.12 + 0.58 * np.maximum(body, neck) + 0.1 * arms
    image += 0.12 / (1.0 + np.exp(-(v - LUNG_BOTTOM - dy) / 0.02)) * body  # liver / abdomen below the diaphragm
    lungs = lung_fields(size, shift)
    soft_lungs = ndi.gaussian_filter(lungs.astype(np.float32), 0.01 * size)
    vessels = np.clip(_smooth_noise(rng, size, 0.01), -2.5, 2.5) * 0.035
    hilum = np.exp(-(((lateral - 0.12) / 0.06) ** 2 + ((v - 0.42 - dy) / 0.12) ** 2))  # vessels fan out from the hila
    darkness = 0.42 + rng.uniform(-0.05, 0.05)
    image = image - soft_lungs * darkness * (1.0 - 0.35 * hilum) + soft_lungs * vessels * (0.6 + hilum)
    image += 0.07 * np.exp(-(((u - 0.5 - dx) / 0.025) ** 2)) * body  # spine through the mediastinum
    image += _ribs(u, v, dx, dy, size) * (0.35 + 0.65 * soft_lungs)
    for side in (-1, 1):  # clavicles
        along = (u - 0.5 - dx) * side
        clavicle = np.exp(-(((v - 0.12 - dy + 0.1 * along) / 0.011) ** 2)) * (along > 0.04) * (along < 0.34)
        image += 0.1 * clavicle
    return image, lungs


def _ribs(u: np.ndarray, v: np.ndarray, dx: float, dy: float, size: int) -> np.ndarray:
    """Posterior ribs: arcs leaving the spine, rising a little, then curving down towards the flanks."""
    ribs = np.zeros((size, size), np.float32)
    lateral = np.abs(u - 0.5 - dx)
    for k in range(10):
        y0 = LUNG_TOP + dy - 0.03 + k * 0.068
        centre = y0 - 0.25 * lateral + 1.6 * lateral**2
        thickness = 0.011 + 0.0015 * k
        ribs += np.exp(-(((v - centre) / thickness) ** 2)) * (lateral > 0.03) * (lateral < 0.4)
    return 0.075 * ribs


# ----------------------------------------------------------------------------- lesions


def zone_box(zone: str, size: int) -> tuple[float, float, float, float]:
    """(row0, row1, col0, col1) in pixels where a zone's lesion is placed.

    A third of ZONE_TOP..ZONE_BOTTOM on one side of the midline; the lower zone reaches down to LUNG_BOTTOM.
    """
    level, side = split_zone(zone)
    third = (ZONE_BOTTOM - ZONE_TOP) / 3
    row0 = ZONE_TOP + LEVELS.index(level) * third
    row1 = LUNG_BOTTOM if level == "lower" else row0 + third
    col0, col1 = (0.12, 0.5) if side == "left" else (0.5, 0.88)
    return row0 * size, row1 * size, col0 * size, col1 * size


def _lesion(rng: np.random.Generator, zone: str, allowed: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One irregular ground-glass blob in a zone, within `allowed` (lung, clear of other lesions).

    Returns (opacity in [0, 1], bool mask of one 8-connected area).
    """
    row0, row1, col0, col1 = zone_box(zone, size)
    in_zone = np.zeros((size, size), bool)
    in_zone[int(round(row0)) : int(round(row1)), int(round(col0)) : int(round(col1))] = True
    core = ndi.binary_erosion(allowed & in_zone, iterations=max(1, size // 40))  # keep the seed off the edges
    candidates = np.argwhere(core if core.any() else allowed & in_zone)
    if len(candidates) == 0:  # a very small image: fall back to the zone box centre
        candidates = np.array([[int((row0 + row1) / 2), int((col0 + col1) / 2)]])
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = candidates[rng.integers(len(candidates))]
    radius = (ZONE_BOTTOM - ZONE_TOP) / 3 * size * rng.uniform(0.3, 0.45)
    blob = np.zeros((size, size), np.float32)
    for _ in range(3):  # a few overlapping lobes make the outline irregular
        offset = rng.normal(0, radius * 0.35, size=2)
        r = radius * rng.uniform(0.55, 0.9)
        blob += np.exp(-(((rows - centre[0] - offset[0]) ** 2 + (cols - centre[1] - offset[1]) ** 2) / (2 * r * r)))
    blob = blob / blob.max() + 0.15 * _smooth_noise(rng, size, 0.02)
    labels, count = ndi.label((blob > 0.5) & allowed & in_zone, structure=np.ones((3, 3), bool))
    if count == 0:  # keep at least the seed pixel so every named zone has a lesion
        mask = np.zeros((size, size), bool)
        mask[centre[0], centre[1]] = True
    else:  # one infected area per zone: the largest connected piece
        mask = labels == 1 + int(np.argmax(ndi.sum_labels(np.ones_like(labels), labels, range(1, count + 1))))
    opacity = np.clip(blob, 0, 1) * ndi.gaussian_filter(mask.astype(np.float32), max(0.012 * size, 0.5))
    return opacity, mask


# ----------------------------------------------------------------------------- phantoms


def make_phantom(seed: int, size: int = 224, zones: list[str] | None = None) -> Phantom:
    """A chest X-ray phantom with one lesion per named zone (random zones when `zones` is None)."""
    if size < 16:
        raise ValueError(f"phantom size must be at least 16 pixels, got {size}")
    rng = np.random.default_rng(seed)
    if zones is None:
        count = int(rng.choice([1, 2, 2, 3]))
        zones = [ZONES[i] for i in sorted(rng.choice(len(ZONES), size=count, replace=False))]
    zones = [" ".join(split_zone(zone)) for zone in zones]
    if not zones:
        raise ValueError("a phantom needs at least one lesion zone")
    image, lungs = _anatomy(rng, size)
    lesions = []
    haze = np.zeros((size, size), np.float32)
    union = np.zeros((size, size), bool)
    for zone in dict.fromkeys(zones):  # one lesion per distinct zone, in the given order
        free = lungs & ~ndi.binary_dilation(union, structure=np.ones((3, 3), bool))  # areas never touch
        opacity, mask = _lesion(rng, zone, free, size)
        haze = np.maximum(haze, opacity)
        union |= mask
        lesions.append(Lesion(zone=zone, mask=mask))
    image = image + 0.3 * haze
    image = ndi.gaussian_filter(image, 0.004 * size) + rng.normal(0, 0.015, (size, size))
    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    n_areas = count_areas(union)
    return Phantom(image=pixels, mask=union, description=describe(list(zones), n_areas), lesions=lesions)


def write_lvit_dataset(root: str | Path, n_train: int, n_val: int, size: int = 224, seed: int = 0) -> Path:
    """Write phantoms in the LViT layout (Train_Folder/Val_Folder, img/, labelcol/, *_text.xlsx); returns root.

    Phantom i of a split uses seed `seed * 1_000_003 + offset + i`, so the dataset is reproducible and
    the train and val phantoms differ.
    """
    root = Path(root)
    for folder_name, count, offset in (("Train_Folder", n_train, 0), ("Val_Folder", n_val, 500_000)):
        folder = root / folder_name
        (folder / "img").mkdir(parents=True, exist_ok=True)
        (folder / "labelcol").mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(count):
            phantom = make_phantom(seed * 1_000_003 + offset + i, size=size)
            name = f"phantom_{i:05d}"
            write_png(folder / "img" / f"{name}.png", phantom.image)
            write_png(folder / "labelcol" / f"mask_{name}.png", phantom.mask.astype(np.uint8) * 255)
            rows.append((f"mask_{name}.png", phantom.description))
        write_text_table(folder / f"{folder_name.split('_')[0]}_text.xlsx", rows)
    return root


def write_png(path: Path, pixels: np.ndarray) -> None:
    """An 8-bit grayscale PNG, written atomically."""
    from skimage import io as skio  # imported on first use: it takes about a second

    from napari_mris.io.atomic import atomic_path  # importing napari_mris.io loads pydicom and SimpleITK

    with atomic_path(path) as tmp:
        skio.imsave(tmp, pixels, check_contrast=False)


def write_text_table(path: Path, rows: list[tuple[str, str]]) -> None:
    """An LViT description table (Image, Description) as .xlsx or .csv, written atomically."""
    from napari_mris.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".csv":
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["Image", "Description"])
                writer.writerows(rows)
        else:
            import openpyxl

            book = openpyxl.Workbook()
            sheet = book.active
            sheet.append(["Image", "Description"])
            for row in rows:
                sheet.append(list(row))
            book.save(tmp)
