"""Label writers: PNG / NIfTI / NRRD / MHA round trips and DICOM SEG exports checked with highdicom."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import skimage.io
from test_io_read import make_enhanced_ct, make_monochrome1_dx

from napari_mris.errors import ExportError
from napari_mris.io import Slice, read_slice, write_dicom_seg, write_labels, write_nifti, write_png

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")


@pytest.fixture(scope="module")
def ct_stack(ct_3slice) -> Slice:
    return read_slice(ct_3slice)


@pytest.fixture(scope="module")
def liver_labels(ct_3slice) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(ct_3slice / "liver_seg.nrrd"))).astype(np.uint8)


def _plain_slice(shape, spacing, origin, direction=None) -> Slice:
    direction = np.eye(len(shape)) if direction is None else direction
    return Slice(np.zeros(shape, np.float32), spacing, origin, direction, name="plain")


def _no_leftovers(folder) -> bool:
    """Atomic writes leave no temporary '.name.*' files behind."""
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- PNG


def test_png_binary_and_label_values(tmp_path):
    labels = np.zeros((20, 30), np.uint16)
    labels[5:10, 5:15] = 1
    write_labels(tmp_path / "one.png", labels)  # one label value -> 0/255 mask
    np.testing.assert_array_equal(skimage.io.imread(tmp_path / "one.png"), labels * 255)
    labels[12:15, 20:25] = 3
    write_labels(tmp_path / "two.png", labels)  # several values -> the values themselves
    np.testing.assert_array_equal(read_slice(tmp_path / "two.png").pixels, labels)
    labels[0, 0] = 300
    write_png(tmp_path / "wide.png", labels, binary=False)
    read = skimage.io.imread(tmp_path / "wide.png")
    assert read.dtype == np.uint16 and read[0, 0] == 300
    write_png(tmp_path / "empty.png", np.zeros((4, 4), np.int32))
    assert not skimage.io.imread(tmp_path / "empty.png").any()
    assert _no_leftovers(tmp_path)


def test_png_refuses_stacks_and_bad_values(tmp_path):
    with pytest.raises(ExportError, match=r"stack\.png.*one 2D plane"):
        write_png(tmp_path / "stack.png", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ExportError, match="0..65535"):
        write_png(tmp_path / "neg.png", np.full((4, 4), -1))
    with pytest.raises(ExportError, match="whole numbers"):
        write_png(tmp_path / "float.png", np.full((4, 4), 0.5))
    with pytest.raises(ExportError, match=r"labels\.jpg.*unknown label file type"):
        write_labels(tmp_path / "labels.jpg", np.zeros((4, 4), np.uint8))
    assert not list(tmp_path.iterdir())
    (tmp_path / "file.txt").write_text("a file, not a folder")
    with pytest.raises(ExportError, match=r"x\.png: the file could not be written"):
        write_png(tmp_path / "file.txt" / "x.png", np.zeros((4, 4), np.uint8))


# ----------------------------------------------------------------------------- NIfTI / NRRD / MHA


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_volume_round_trip_keeps_geometry(tmp_path, suffix):
    labels = np.zeros((3, 10, 12), np.uint16)
    labels[1, 2:6, 3:9] = 2
    labels[2, 0, 0] = 700
    direction = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])
    like = _plain_slice(labels.shape, (2.5, 0.75, 0.5), (-30.0, 12.0, 4.5), direction)
    path = write_nifti(tmp_path / f"labels{suffix}", labels, like)
    read = read_slice(path)
    np.testing.assert_array_equal(read.pixels, labels)
    np.testing.assert_allclose(read.spacing, like.spacing, rtol=1e-6)
    np.testing.assert_allclose(read.origin, like.origin, atol=1e-5)
    np.testing.assert_allclose(read.direction, direction, atol=1e-6)
    assert _no_leftovers(tmp_path)


def test_nifti_2d_and_empty(tmp_path):
    like = _plain_slice((8, 9), (0.7, 0.3), (5.0, -2.0))
    write_labels(tmp_path / "empty.nii.gz", np.zeros((8, 9), np.uint8), like=like)
    read = read_slice(tmp_path / "empty.nii.gz")
    assert read.shape == (8, 9) and not read.pixels.any()
    np.testing.assert_allclose(read.spacing, (0.7, 0.3), rtol=1e-6)
    with pytest.raises(ExportError, match=r"shape \(8, 8\).*shape \(8, 9\)"):
        write_nifti(tmp_path / "bad.nii", np.zeros((8, 8), np.uint8), like)


def test_nifti_of_a_dicom_slice_keeps_its_place_in_the_patient(tmp_path, ct_3slice, ct_stack, liver_labels):
    plane = ct_stack.slice_at(1)  # 02.dcm
    write_nifti(tmp_path / "plane.nii.gz", liver_labels[1], plane)
    stored = sitk.ReadImage(str(tmp_path / "plane.nii.gz"))
    ds = pydicom.dcmread(ct_3slice / "02.dcm")
    assert stored.GetSize() == (512, 512, 1)
    np.testing.assert_allclose(stored.GetOrigin(), [float(v) for v in ds.ImagePositionPatient], atol=1e-4)
    read = read_slice(tmp_path / "plane.nii.gz")
    np.testing.assert_array_equal(read.pixels, liver_labels[1])
    np.testing.assert_allclose(read.spacing, plane.spacing, rtol=1e-6)


# ----------------------------------------------------------------------------- DICOM SEG


def test_seg_of_ct_stack_aligns_with_source(tmp_path, ct_stack, liver_labels):
    prompt = "the liver in the right upper abdomen, below the diaphragm, all three slices please"
    assert len(prompt) > 64
    path = write_dicom_seg(tmp_path / "liver.dcm", liver_labels, ct_stack, {1: prompt})
    seg = hd.seg.segread(path)
    assert seg.number_of_segments == 1
    description = seg.get_segment_description(1)
    assert description.SegmentLabel == prompt[:64].strip() and description.SegmentDescription == prompt
    assert description.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert description.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "napari-mris"
    source_uids = [d.SOPInstanceUID for d in ct_stack.dicom]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        referenced = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = ct_stack.dicom[source_uids.index(referenced)]
        assert frame.PlanePositionSequence[0].ImagePositionPatient == source.ImagePositionPatient
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0], liver_labels)
    assert _no_leftovers(tmp_path)


def test_seg_label_values_become_consecutive_segments(tmp_path, ct_stack, liver_labels):
    labels = liver_labels.astype(np.uint16) * 7
    labels[:, 10:20, 10:20] = 2
    prompts = {2: "corner", 7: "Leber – größter Lappen"}  # any character: the SEG is written in UTF-8
    path = write_labels(tmp_path / "two.dcm", labels, like=ct_stack, segment_labels=prompts)
    seg = hd.seg.segread(path)
    assert [seg.get_segment_description(n).SegmentLabel for n in (1, 2)] == ["corner", prompts[7]]
    source_uids = [d.SOPInstanceUID for d in ct_stack.dicom]
    pixels = seg.get_pixels_by_source_instance(source_uids, segment_numbers=[1, 2], combine_segments=True)
    np.testing.assert_array_equal(pixels, np.select([labels == 2, labels == 7], [1, 2], 0))


def test_seg_of_one_plane_references_that_slice(tmp_path, ct_stack, liver_labels):
    plane = ct_stack.slice_at(2)
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "plane.dcm", liver_labels[2], plane, {1: "liver"}))
    assert seg.number_of_frames == 1
    assert [uids[2] for uids in seg.get_source_image_uids()] == [plane.dicom[0].SOPInstanceUID]
    pixels = seg.get_pixels_by_source_instance([plane.dicom[0].SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, ..., 0], liver_labels[2])


def test_seg_of_multiframe_plane_maps_to_its_frame(tmp_path):
    path, _ = make_enhanced_ct(tmp_path / "mf.dcm")
    image = read_slice(path)
    plane = image.slice_at(0)  # z = 0.0 is stored as frame 3
    labels = np.zeros(plane.shape, np.uint8)
    labels[4:8, 5:10] = 1
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "seg.dcm", labels, plane, {1: "nodule"}))
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    assert seg.number_of_frames == 1
    assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber == 3
    pixels = seg.get_pixels_by_source_frame(image.dicom[0].SOPInstanceUID, [3], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, ..., 0], labels)


def test_seg_of_projection_xray(tmp_path):
    path, _ = make_monochrome1_dx(tmp_path / "dx.dcm")
    image = read_slice(path)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:20, 5:15] = 1
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "seg.dcm", labels, image, {1: "bone"}, algorithm_type="AUTOMATIC"))
    assert seg.get_segment_description(1).SegmentAlgorithmType == "AUTOMATIC"
    pixels = seg.get_pixels_by_source_instance([image.dicom[0].SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, ..., 0], labels)


def test_seg_errors(tmp_path, ct_stack):
    (tmp_path / "keep.dcm").write_bytes(b"previous export")
    with pytest.raises(ExportError, match=r"keep\.dcm.*empty.*at least one segment"):
        write_dicom_seg(tmp_path / "keep.dcm", np.zeros(ct_stack.shape, np.uint8), ct_stack, {})
    assert (tmp_path / "keep.dcm").read_bytes() == b"previous export"
    with pytest.raises(ExportError, match=r"shape \(3, 512, 511\)"):
        write_dicom_seg(tmp_path / "a.dcm", np.ones((3, 512, 511), np.uint8), ct_stack, {})
    with pytest.raises(ExportError, match="not DICOM"):
        write_dicom_seg(tmp_path / "b.dcm", np.ones((4, 4), np.uint8), _plain_slice((4, 4), (1, 1), (0, 0)), {})
    with pytest.raises(ExportError, match="needs the source DICOM image"):
        write_labels(tmp_path / "c.dcm", np.ones((4, 4), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.dcm"]
