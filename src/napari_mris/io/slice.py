"""`Slice`: one image (2D) or a small stack (3D) with the physical geometry the tool needs.

Every reader returns a `Slice` and every writer takes one as its geometric reference, so the rules live here
once: pixels are float32 in the file's physical units (HU for CT), geometry is in numpy array-axis order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from napari_mris.errors import ImageReadError


@dataclass
class Slice:
    """An image ready for display and segmentation.

    Geometry is given per array axis, so that `physical = origin + direction @ (spacing * index)` with the
    index and the physical coordinates both in array order (for a volume: z, y, x). For a 2D DICOM slice the
    origin/direction are the in-plane part of its 3D geometry; the full 3D geometry stays in `dicom`.
    """

    pixels: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    window: tuple[float, float] | None = None
    source_path: Path | None = None
    # source DICOM headers, one per plane (the same object for every frame of a multi-frame file); the
    # pixel data is dropped after decoding - `pixels` holds it - which is all a DICOM SEG export needs
    dicom: list[pydicom.Dataset] = field(default_factory=list)
    name: str = ""
    # 1-based frame numbers in the (single) multi-frame source dataset, one per plane of `pixels`;
    # empty when the planes come from single-frame datasets (or from no DICOM at all).
    frame_numbers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.pixels = np.asarray(self.pixels, dtype=np.float32)
        ndim = self.pixels.ndim
        if ndim not in (2, 3):
            raise ValueError(f"Slice pixels must be 2D or 3D, got shape {self.pixels.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64)
        if len(self.spacing) != ndim or len(self.origin) != ndim or self.direction.shape != (ndim, ndim):
            raise ValueError(
                f"Slice geometry does not match pixels {self.pixels.shape}: spacing {self.spacing}, "
                f"origin {self.origin}, direction {self.direction.shape}"
            )
        if self.window is not None:
            self.window = (float(self.window[0]), float(self.window[1]))
        if self.dicom and len(self.dicom) != self.n_planes:
            raise ValueError(f"Slice has {self.n_planes} planes but {len(self.dicom)} DICOM datasets")
        if self.frame_numbers and len(self.frame_numbers) != self.n_planes:
            raise ValueError(f"Slice has {self.n_planes} planes but {len(self.frame_numbers)} frame numbers")

    @property
    def is_volume(self) -> bool:
        """True for a (Z, H, W) stack, False for a single (H, W) plane."""
        return self.pixels.ndim == 3

    @property
    def n_planes(self) -> int:
        return self.pixels.shape[0] if self.is_volume else 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)

    def slice_at(self, z: int) -> Slice:
        """The 2D plane `z` of a stack (a 2D slice returns itself for z == 0), with its own DICOM dataset.

        The plane keeps its physical position: its origin is the in-plane part of the position of plane z.
        """
        if not self.is_volume:
            if z != 0:
                raise IndexError(f"{self.name or 'slice'} is 2D; only plane 0 exists, not {z}")
            return self
        if not -self.n_planes <= z < self.n_planes:
            raise IndexError(f"{self.name or 'stack'} has {self.n_planes} planes; plane {z} does not exist")
        z = z % self.n_planes
        plane_origin = np.asarray(self.origin) + self.direction[:, 0] * self.spacing[0] * z
        return dataclasses.replace(
            self,
            pixels=self.pixels[z],
            spacing=self.spacing[1:],
            origin=tuple(plane_origin[1:]),
            direction=self.direction[1:, 1:],
            dicom=self.dicom[z : z + 1],
            name=f"{self.name} [{z}]" if self.name else f"[{z}]",
            frame_numbers=self.frame_numbers[z : z + 1],
        )


def check_finite(pixels: np.ndarray, path: Path, where: str = "") -> None:
    """Refuse NaN / infinite pixels: no window or threshold is defined on them, and silently zeroing them
    (as some readers do) would hand the model an image that is not the file's."""
    bad = int(pixels.size - np.count_nonzero(np.isfinite(pixels)))
    if bad:
        raise ImageReadError(
            f"{path}{where}: {bad} of {pixels.size} pixels are NaN or infinite; napari-mris cannot window or "
            "segment such an image (replace them with a real value, e.g. the background, and save it again)"
        )


def identity_geometry(shape: tuple[int, ...]) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """Spacing 1, origin 0, identity direction: the geometry of a file that carries none (PNG, JPEG)."""
    ndim = len(shape)
    return (1.0,) * ndim, (0.0,) * ndim, np.eye(ndim)


def file_slice(
    array: np.ndarray, path: Path, geometry: tuple[tuple[float, ...], tuple[float, ...], np.ndarray], name: str
) -> Slice:
    """The Slice of a file's pixels as stored (float32, every pixel finite) with the file's geometry
    (spacing, origin, direction) and no display window: the last step of every non-DICOM reader."""
    pixels = array.astype(np.float32)
    check_finite(pixels, path)
    spacing, origin, direction = geometry
    return Slice(pixels, spacing, origin, direction, window=None, source_path=path, name=name)
