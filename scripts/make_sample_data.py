"""Regenerate `sample_data/`: phantom chest X-rays in the LViT layout plus one DX DICOM file.

    python scripts/make_sample_data.py [--out sample_data]

Deterministic: the same code writes byte-identical files (fixed seeds, UIDs derived from fixed strings,
no timestamps), so `tests/test_phantom.py` can check that the committed folder is up to date.

Contents (all synthetic, no patient data):

- img/, labelcol/, sample_text.csv: an LViT split folder (`load_split("sample_data")` opens it). Next to the
  full descriptions there are prompts naming only some of the lesions, with the matching partial masks,
  and one absent-target prompt (a zone without lesions) whose mask is empty: the answer is a rejection.
- dicom/phantom_07.dcm: phantom 7 as a Digital X-Ray (DX, for presentation) file, 12-bit MONOCHROME2,
  with PixelSpacing / ImagerPixelSpacing and valid UIDs, usable as the source of a DICOM SEG.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from napari_mris.io.atomic import atomic_path, write_bytes_atomic
from napari_mris.phantom import Phantom, make_phantom, write_png
from napari_mris_train.prompts import absent_target, describe

REPO = Path(__file__).resolve().parents[1]
PHANTOM_SEEDS = (7, 11, 13)  # 7: three areas on both sides (the demo's phantom), 11: one area, 13: "all right lung"
DICOM_SEED = 7
PIXEL_SPACING_MM = 1.6  # a 224-pixel phantom then spans ~36 cm, the width of an adult chest film
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def sample_rows(phantom: Phantom, name: str) -> list[tuple[str, np.ndarray, str]]:
    """(file stem, mask, description): the full finding, each side alone, and one absent-target prompt."""
    rows = [(name, phantom.mask, phantom.description)]
    for side in ("left", "right"):
        lesions = [lesion for lesion in phantom.lesions if lesion.zone.endswith(side)]
        if lesions and len(lesions) < len(phantom.lesions):  # only proper parts of the finding
            part = np.logical_or.reduce([lesion.mask for lesion in lesions])
            rows.append((f"{name}_{side}", part, describe([lesion.zone for lesion in lesions], len(lesions))))
    absent = absent_target(phantom.mask, np.random.default_rng(0))
    if absent is not None:
        rows.append((f"{name}_absent", np.zeros_like(phantom.mask), absent))
    return rows


def write_lvit_samples(out: Path) -> list[Path]:
    written = []
    table = []
    for seed in PHANTOM_SEEDS:
        phantom = make_phantom(seed)
        for stem, mask, description in sample_rows(phantom, f"phantom_{seed:02d}"):
            write_png(out / "img" / f"{stem}.png", phantom.image)
            write_png(out / "labelcol" / f"mask_{stem}.png", mask.astype(np.uint8) * 255)
            written += [out / "img" / f"{stem}.png", out / "labelcol" / f"mask_{stem}.png"]
            table.append((f"mask_{stem}.png", description))
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["Image", "Description"])
    writer.writerows(table)
    write_bytes_atomic(out / "sample_text.csv", text.getvalue().encode("utf-8"))
    return [*written, out / "sample_text.csv"]


def phantom_dx_dataset(phantom: Phantom, name: str) -> pydicom.Dataset:
    """A DX 'for presentation' dataset of a phantom: synthetic identifiers only, UIDs derived from `name`."""

    def uid(what: str) -> str:
        return generate_uid(entropy_srcs=["napari-mris sample data", name, what])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = uid("instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.FrameOfReferenceUID = uid("frame of reference")
    ds.PatientName, ds.PatientID = "PHANTOM^MRIS", name.upper()
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.StudyDescription, ds.SeriesDescription = "Synthetic chest X-ray phantom", f"napari-mris {name}"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.Manufacturer, ds.ManufacturerModelName = "napari-mris", "phantom generator"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.PatientOrientation = ["L", "F"]  # columns run towards the patient's left, rows towards the feet
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    pixels = phantom.image.astype(np.uint16) * 16  # 12-bit, like a detector's output
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelData = pixels.tobytes()
    return ds


def write_dicom_sample(out: Path) -> Path:
    name = f"phantom_{DICOM_SEED:02d}"
    path = out / "dicom" / f"{name}.dcm"
    ds = phantom_dx_dataset(make_phantom(DICOM_SEED), name)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "sample_data", help="output folder")
    args = parser.parse_args(argv)
    files = write_lvit_samples(args.out) + [write_dicom_sample(args.out)]
    total = sum(path.stat().st_size for path in files)
    print(f"wrote {len(files)} files, {total / 1024:.0f} KiB, to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
