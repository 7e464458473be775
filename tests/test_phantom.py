"""Phantoms: anatomy, zone placement, LViT-style text and the LViT-layout dataset writer."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from skimage import io as skio

from napari_mris.phantom import (
    ZONES,
    count_areas,
    describe,
    lung_fields,
    make_phantom,
    write_lvit_dataset,
    zone_box,
)


def test_phantom_types_and_determinism() -> None:
    a, b = make_phantom(7), make_phantom(7)
    assert a.image.dtype == np.uint8 and a.image.shape == (224, 224)
    assert a.mask.dtype == bool and a.mask.shape == (224, 224)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.description == b.description
    assert not np.array_equal(a.image, make_phantom(8).image)


def test_looks_like_a_chest_x_ray() -> None:
    """Dark lung fields inside brighter soft tissue, a bright spine and abdomen, visible texture."""
    phantom = make_phantom(1, zones=["upper left"])
    image = phantom.image.astype(float)
    lungs = lung_fields(224) & ~phantom.mask
    body = np.zeros((224, 224), bool)
    body[20:150, 100:124] = True  # mediastinum / spine between the lungs
    assert image[lungs].mean() < image[body].mean() - 40
    assert image[180:210, 60:164].mean() > image[lungs].mean() + 60  # below the diaphragm
    assert image[lungs].std() > 5  # vessels, ribs and noise, not a flat fill


@pytest.mark.parametrize("zone", ZONES)
def test_lesion_sits_in_its_zone_inside_the_lungs(zone: str) -> None:
    phantom = make_phantom(3, zones=[zone])
    (lesion,) = phantom.lesions
    assert lesion.zone == zone
    row0, row1, col0, col1 = zone_box(zone, 224)
    rows, cols = np.nonzero(lesion.mask)
    assert rows.size > 50
    assert row0 - 1 <= rows.min() and rows.max() <= row1 + 1
    assert col0 - 1 <= cols.min() and cols.max() <= col1 + 1
    assert lung_fields(224, (0.0, 0.0))[lesion.mask].mean() > 0.8  # placed in the (slightly shifted) lungs
    side = zone.split()[1]
    assert (cols.mean() < 112) == (side == "left")  # left = the viewer's left


def test_lesion_is_brighter_than_the_lung_around_it() -> None:
    phantom = make_phantom(5, zones=["middle right"])
    ring = lung_fields(224) & ~phantom.mask
    assert phantom.image[phantom.mask].mean() > phantom.image[ring].mean() + 15


def test_description_names_zones_and_counts_areas() -> None:
    phantom = make_phantom(11, zones=["lower left", "middle right", "upper right"])
    assert [lesion.zone for lesion in phantom.lesions] == ["lower left", "middle right", "upper right"]
    assert count_areas(phantom.mask) == 3  # lesions never touch
    assert np.array_equal(phantom.mask, np.logical_or.reduce([lesion.mask for lesion in phantom.lesions]))
    assert phantom.description == (
        "Bilateral pulmonary infection, three infected areas, lower left lung and upper middle right lung."
    )


@pytest.mark.parametrize(
    ("zones", "n", "text"),
    [
        (["upper right"], 1, "Unilateral pulmonary infection, one infected area, upper right lung."),
        (
            ["lower right", "lower left"],
            2,
            "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung.",
        ),
        (
            ["upper left", "lower left", "middle left", "middle right", "lower right"],
            2,
            "Bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung.",
        ),
        (["Upper Left", "lower left"], 2, "Unilateral pulmonary infection, two infected areas, upper lower left lung."),
        (["middle left"], 12, "Unilateral pulmonary infection, 12 infected areas, middle left lung."),
    ],
)
def test_describe_wording(zones: list[str], n: int, text: str) -> None:
    assert describe(zones, n) == text


def test_describe_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown lung zone"):
        describe(["upper centre"], 1)
    with pytest.raises(ValueError, match="at least one infected area"):
        describe(["upper left"], 0)
    with pytest.raises(ValueError, match="unknown lung zone"):
        make_phantom(0, zones=["left"])


def test_random_zones_give_one_to_three_lesions() -> None:
    counts = {len(make_phantom(seed, size=32).lesions) for seed in range(30)}
    assert counts <= {1, 2, 3} and len(counts) >= 2


def test_write_lvit_dataset_layout_and_speed(tmp_path: Path) -> None:
    import openpyxl  # noqa: F401  (import once outside the timing: a one-off ~1 s per process on this machine)
    import skimage.io  # noqa: F401

    start = time.process_time()  # CPU time: the shared 2-core test machine makes wall time noisy
    root = write_lvit_dataset(tmp_path / "ds", n_train=32, n_val=8, size=32, seed=1)
    elapsed = time.process_time() - start
    assert elapsed < 2.0, f"40 phantoms of 32 px took {elapsed:.2f} s of CPU time"
    train = root / "Train_Folder"
    assert len(list((train / "img").glob("*.png"))) == 32
    assert len(list((train / "labelcol").glob("mask_*.png"))) == 32
    assert (train / "Train_text.xlsx").is_file() and (root / "Val_Folder" / "Val_text.xlsx").is_file()
    assert len(list((root / "Val_Folder" / "img").glob("*.png"))) == 8
    assert not list(root.rglob(".*"))  # no temporary files left behind


# ----------------------------------------------------------------------------- sample data

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_sample_data_is_what_the_script_writes(tmp_path: Path) -> None:
    """Pixels, masks, text and DICOM content of sample_data/ equal a fresh run of the script."""
    _load_script().main(["--out", str(tmp_path)])
    committed = sorted(p.relative_to(REPO / "sample_data") for p in (REPO / "sample_data").rglob("*") if p.is_file())
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert [p for p in committed if p.name != "README.md"] == fresh
    for rel in fresh:
        old, new = REPO / "sample_data" / rel, tmp_path / rel
        if rel.suffix == ".png":
            assert np.array_equal(skio.imread(old), skio.imread(new)), rel
        elif rel.suffix == ".dcm":
            a, b = pydicom.dcmread(old), pydicom.dcmread(new)
            assert a.SOPInstanceUID == b.SOPInstanceUID and a.PixelData == b.PixelData, rel
        else:
            assert old.read_text(encoding="utf-8") == new.read_text(encoding="utf-8"), rel
    assert sum((REPO / "sample_data" / rel).stat().st_size for rel in committed) < 1_000_000


def test_sample_folder_is_an_lvit_split_with_partial_and_absent_prompts() -> None:
    from napari_mris_train.data import load_split
    from napari_mris_train.prompts import lesion_zones, parse_zones

    split = load_split(REPO / "sample_data")
    assert split.problems == [] and len(split) == 8
    examples = {example.name: example for example in (split[i] for i in range(len(split)))}
    full, right = examples["phantom_07"], examples["phantom_07_right"]
    assert np.array_equal(full.image, right.image)
    assert right.mask.any() and right.mask.sum() < full.mask.sum() and not (right.mask & ~full.mask).any()
    assert parse_zones(right.description) == [zone for zone, _ in lesion_zones(right.mask)]
    absent = examples["phantom_07_absent"]
    assert not absent.mask.any()
    assert not set(parse_zones(absent.description)) & {zone for zone, _ in lesion_zones(full.mask)}


def test_sample_dicom_is_a_valid_dx_source_for_dicom_seg() -> None:
    import highdicom as hd

    from napari_mris.io import read_slice

    path = REPO / "sample_data" / "dicom" / "phantom_07.dcm"
    ds = pydicom.dcmread(path)
    assert (ds.Modality, ds.PhotometricInterpretation, str(ds.PatientName)) == ("DX", "MONOCHROME2", "PHANTOM^MRIS")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID):
        assert pydicom.uid.UID(uid).is_valid
    image = read_slice(path)
    assert image.spacing == (1.6, 1.6)
    assert np.array_equal(image.pixels, make_phantom(7).image.astype(np.float32) * 16)
    mask = np.zeros((1, 224, 224), bool)
    mask[0, 150:170, 40:60] = True
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="infected area",
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=hd.sr.CodedConcept("3898006", "SCT", "Neoplasm"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=[ds],
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=2,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-mris",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ds.SeriesInstanceUID


def test_sample_contributions_return_layer_tuples() -> None:
    from napari_mris._sample_data import make_ct_small_sample, make_phantom_sample

    ((data, kwargs, kind),) = make_phantom_sample()
    assert kind == "image" and data.shape == (224, 224)
    assert kwargs["metadata"]["mris_description"] == make_phantom(7).description
    assert np.array_equal(kwargs["metadata"]["mris_slice"].pixels, data)
    ((data, kwargs, kind),) = make_ct_small_sample()
    assert kind == "image" and data.shape == (128, 128)
    ct = kwargs["metadata"]["mris_slice"]
    assert kwargs["scale"] == ct.spacing and ct.dicom[0].Modality == "CT"
    assert data.min() < -500  # Hounsfield units (air), not raw stored values


def test_open_sample_through_the_plugin_manifest() -> None:
    """File > Open Sample path: npe2 finds the contribution in napari.yaml and adds the layer.

    napari's ViewerModel runs the same open_sample code as the Qt viewer, without needing OpenGL (absent
    on the headless test machine).
    """
    from napari.components import ViewerModel
    from npe2 import PluginManager

    PluginManager.instance().discover(include_npe1=False)
    viewer = ViewerModel()
    viewer.open_sample("napari-mris", "phantom")
    viewer.open_sample("napari-mris", "ct_small")
    phantom, ct = viewer.layers["chest X-ray phantom"], viewer.layers["CT_small"]
    assert phantom.metadata["mris_description"] == make_phantom(7).description
    assert ct.metadata["mris_slice"].dicom[0].Modality == "CT"
