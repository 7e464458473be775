"""LViT-layout datasets: QaTa-COV19, MosMedData+, and the widget's corrections folders.

The layout (Li et al., LViT, IEEE TMI 2023) is one folder per split::

    root/Train_Folder/img/<name>.png
                     labelcol/mask_<name>.png
                     Train_text.xlsx            (or *_text.csv; columns Image, Description)

`load_split` pairs images, masks and descriptions eagerly (file existence only, so opening the 5,716
QaTa training pairs takes well under a second) and reads pixels lazily in `LViTSplit[i]`. Every pair it
cannot use is dropped with a reason in `LViTSplit.problems` rather than failing the whole split, because
public datasets ship with a few stray rows; a split with no usable pair at all is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_mris.errors import DatasetError
from napari_mris.io.text_table import find_text_file, read_text_table

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_PREFIX = "mask_"
# Accepted folder names (lower case) for each split name; LViT itself uses Train_Folder / Val_Folder / Test_Folder.
SPLIT_ALIASES = {
    "train": ("train_folder", "train", "training"),
    "val": ("val_folder", "val", "valid", "validation"),
    "test": ("test_folder", "test", "testing"),
}
MAX_LOGGED_PROBLEMS = 10


@dataclass
class Example:
    """One training pair: a grayscale image, its binary mask and the referring description."""

    name: str
    image: np.ndarray  # uint8 (H, W)
    mask: np.ndarray  # bool (H, W)
    description: str


@dataclass
class LViTSplit:
    """The usable pairs of one split folder; pixels are read on access."""

    folder: Path
    text_file: Path
    pairs: list[tuple[str, Path, Path, str]]  # (name, image_path, mask_path, description)
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Example:
        name, image_path, mask_path, description = self.pairs[index]
        image = read_gray(image_path)
        mask = read_mask(mask_path)
        if image.shape != mask.shape:
            raise DatasetError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} pixels but its image {image_path.name} "
                f"is {image.shape[1]}x{image.shape[0]}"
            )
        return Example(name=name, image=image, mask=mask, description=description)

    @property
    def descriptions(self) -> list[str]:
        return [pair[3] for pair in self.pairs]

    @property
    def names(self) -> list[str]:
        return [pair[0] for pair in self.pairs]

    def summary(self) -> str:
        """One line for logs and CLIs: how many pairs were kept and how many dropped."""
        text = f"{self.folder}: kept {len(self.pairs)} pairs"
        if self.problems:
            text += f", dropped {len(self.problems)} (see .problems)"
        return text


# ----------------------------------------------------------------------------- pixel reading


def read_gray(path: Path) -> np.ndarray:
    """Read an image file as uint8 (H, W) grayscale; RGB(A) is converted by luminance.

    Images that are not 8-bit (e.g. 16-bit PNGs) are stretched min..max to 0..255, since their
    stored range (often 12 bits) says nothing about display contrast.
    """
    pixels = _imread(path)
    if pixels.ndim == 3:
        pixels = _rgb_to_gray(pixels, path)
    if pixels.ndim != 2:
        raise DatasetError(f"{path}: expected a 2D grayscale or RGB image, got an array of shape {pixels.shape}")
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == bool:
        return pixels.astype(np.uint8) * 255
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) / (high - low) * 255.0).astype(np.uint8)


def read_mask(path: Path) -> np.ndarray:
    """Read a mask file as bool (H, W): 0/255 masks are cut at 127, 0/1 masks at 0."""
    pixels = _imread(path)
    if pixels.ndim == 3:
        pixels = _rgb_to_gray(pixels, path)
    if pixels.ndim != 2:
        raise DatasetError(f"{path}: expected a 2D mask, got an array of shape {pixels.shape}")
    if pixels.dtype == bool:
        return pixels.copy()
    threshold = 0 if pixels.max() <= 1 else 127
    return pixels > threshold


def _imread(path: Path) -> np.ndarray:
    from skimage import io as skio

    try:
        return np.asarray(skio.imread(path))
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found (it existed when the split was loaded)") from exc
    except Exception as exc:  # imageio/PIL raise many types for truncated or corrupt files
        raise DatasetError(f"{path}: cannot read the image file ({type(exc).__name__}: {exc})") from exc


def _rgb_to_gray(pixels: np.ndarray, path: Path) -> np.ndarray:
    if pixels.shape[-1] not in (3, 4):
        raise DatasetError(f"{path}: expected 1, 3 or 4 channels, got {pixels.shape[-1]}")
    rgb = pixels[..., :3].astype(np.float64)
    gray = rgb @ np.array([0.2125, 0.7154, 0.0721])  # same weights as skimage.color.rgb2gray
    if pixels.dtype == np.uint8:
        return np.clip(np.round(gray), 0, 255).astype(np.uint8)
    return gray


# ----------------------------------------------------------------------------- layout discovery


def load_split(path: str | Path, *, split: str | None = None) -> LViTSplit:
    """Open one split: `path` is a split folder (with img/ and labelcol/), or a root plus `split`."""
    folder = find_split_folder(Path(path), split)
    image_dir = _child(folder, "img")
    mask_dir = _child(folder, "labelcol")
    if image_dir is None or mask_dir is None:
        raise DatasetError(f"{folder}: not an LViT split folder: expected subfolders img/ and labelcol/ in it")
    text_file = find_text_file(folder)
    split_data = _pair_up(folder, image_dir, mask_dir, text_file)
    _log_summary(split_data)
    return split_data


def concat_splits(splits: list[LViTSplit]) -> LViTSplit:
    """One split holding the pairs of several (QaTa train plus synthetic phantoms, say), in order."""
    if not splits:
        raise DatasetError("no splits to combine")
    first = splits[0]
    pairs = [pair for split in splits for pair in split.pairs]
    names = [pair[0].lower() for pair in pairs]
    if len(set(names)) != len(names):
        raise DatasetError(f"{[s.folder for s in splits]}: the splits share image names; rename one set first")
    problems = [problem for split in splits for problem in split.problems]
    return LViTSplit(folder=first.folder, text_file=first.text_file, pairs=pairs, problems=problems)


def find_split_folder(path: Path, split: str | None) -> Path:
    """Resolve `path` (+ optional split name) to the folder holding img/ and labelcol/."""
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset folder not found")
    if split is None:
        if _child(path, "img") is not None:
            return path
        found = sorted(p.name for p in path.iterdir() if p.is_dir() and _split_name(p.name) is not None)
        hint = f"; it holds split folders {found}, so pass split='train'|'val'|'test'" if found else ""
        raise DatasetError(
            f"{path}: not an LViT split folder: expected img/, labelcol/ and a *_text.xlsx or *_text.csv in it" + hint
        )
    wanted = _split_name(split)
    if wanted is None:
        raise DatasetError(f"unknown split {split!r}: use 'train', 'val' or 'test'")
    for child in sorted(path.iterdir()):
        if child.is_dir() and _split_name(child.name) == wanted:
            return child
    if _child(path, "img") is not None and _split_name(path.name) == wanted:
        return path  # the split folder itself was given together with its own name
    expected = "Train_Folder" if wanted == "train" else "Val_Folder" if wanted == "val" else "Test_Folder"
    raise DatasetError(f"{path}: no {wanted} split here: expected a folder named {expected} (any letter case)")


def _pair_up(folder: Path, image_dir: Path, mask_dir: Path, text_file: Path) -> LViTSplit:
    problems: list[str] = []
    images = _index_files(image_dir, strip_prefix=False, problems=problems)
    masks = _index_files(mask_dir, strip_prefix=True, problems=problems)
    pairs: list[tuple[str, Path, Path, str]] = []
    described: set[str] = set()
    for row_number, (image_name, description) in enumerate(read_text_table(text_file), start=2):
        where = f"{text_file.name} row {row_number}"
        if not image_name:
            if description:
                problems.append(f"{where}: description without an image name")
            continue
        key = _match_key(image_name, images)
        if key is None:
            problems.append(f"{where}: image {image_name!r} not found in {image_dir}")
            continue
        if key in described:
            problems.append(f"{where}: second description for {image_name!r}; the first one is kept")
            continue
        described.add(key)
        image_path = images[key]
        if not description:
            problems.append(f"{where}: empty description for {image_path.name}")
            continue
        mask_path = masks.get(key)
        if mask_path is None:
            problems.append(f"{image_path}: no mask {MASK_PREFIX}{image_path.stem}.png in {mask_dir}")
            continue
        empty = [p for p in (image_path, mask_path) if p.stat().st_size == 0]
        if empty:
            problems.append(f"{empty[0]}: unreadable (empty file)")
            continue
        pairs.append((image_path.stem, image_path, mask_path, description))
    for key, image_path in images.items():
        if key not in described:
            problems.append(f"{image_path}: no description in {text_file.name}")
    for key, mask_path in masks.items():
        if key not in images:
            problems.append(f"{mask_path}: mask without an image in {image_dir}")
    if not pairs:
        shown = "; ".join(problems[:3]) or "no rows"
        raise DatasetError(f"{folder}: no usable image/mask/description triple ({shown})")
    return LViTSplit(folder=folder, text_file=text_file, pairs=pairs, problems=problems)


def _index_files(directory: Path, *, strip_prefix: bool, problems: list[str]) -> dict[str, Path]:
    """Map a case-insensitive name key (stem, `mask_` prefix removed for masks) to the file."""
    index: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
            continue
        key = path.stem.lower()
        if strip_prefix and key.startswith(MASK_PREFIX):
            key = key[len(MASK_PREFIX) :]
        if key in index:
            problems.append(f"{path}: same name as {index[key].name}; only the first is used")
            continue
        index[key] = path
    return index


def _match_key(image_name: str, images: dict[str, Path]) -> str | None:
    """Key of the image a text row names: with or without `mask_`, with any image extension or none."""
    name = Path(image_name.replace("\\", "/")).name.lower()
    if Path(name).suffix in IMAGE_EXTENSIONS:
        name = Path(name).stem
    if name in images:
        return name
    if name.startswith(MASK_PREFIX) and name[len(MASK_PREFIX) :] in images:
        return name[len(MASK_PREFIX) :]
    return None


def _child(folder: Path, name: str) -> Path | None:
    """A subfolder matched case-insensitively (img/, labelcol/)."""
    for child in folder.iterdir():
        if child.is_dir() and child.name.lower() == name:
            return child
    return None


def _split_name(name: str) -> str | None:
    lowered = name.lower()
    for split, aliases in SPLIT_ALIASES.items():
        if lowered in aliases:
            return split
    return None


def _log_summary(split: LViTSplit) -> None:
    if not split.problems:
        log.info("%s", split.summary())
        return
    log.warning("%s", split.summary())
    for problem in split.problems[:MAX_LOGGED_PROBLEMS]:
        log.warning("  dropped: %s", problem)
    if len(split.problems) > MAX_LOGGED_PROBLEMS:
        log.warning("  ... and %d more", len(split.problems) - MAX_LOGGED_PROBLEMS)
