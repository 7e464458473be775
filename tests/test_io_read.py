"""read_slice on real DICOM (ct-3slice, pydicom's test files) and on files the tests write themselves."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import skimage.io
import tifffile
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from napari_mris.errors import ImageReadError, UnsupportedImageError
from napari_mris.io import read_slice

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


# ----------------------------------------------------------------------------- DICOM files written by the tests


def _base_dataset(sop_class: str, modality: str) -> Dataset:
    """The patient/study/series attributes a real file (and highdicom) expects."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "Test^Patient"
    ds.PatientID = "MRIS-TEST"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer = "MRIS tests"
    return ds


def make_monochrome1_dx(path: Path) -> tuple[Path, np.ndarray]:
    """A 12-bit MONOCHROME1 DX: bone stored low (shown white), air stored high, with a VOI window."""
    ds = _base_dataset(DX_STORAGE, "DX")
    stored = np.full((40, 30), 4000, dtype=np.uint16)
    stored[10:20, 5:15] = 100  # "bone"
    ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME1", bits_stored=12)
    ds.ImagerPixelSpacing = [0.139, 0.143]
    ds.WindowCenter, ds.WindowWidth = 1000, 501
    ds.save_as(path, enforce_file_format=True)
    return path, stored


def make_enhanced_ct(path: Path, positions_z=(5.0, 2.5, 0.0)) -> tuple[Path, np.ndarray]:
    """An Enhanced CT multi-frame file; frames stored in descending z so the reader must sort them."""
    ds = _base_dataset(ENHANCED_CT_STORAGE, "CT")
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20240101", "120000", "20240101120000"
    stored = np.stack([np.full((16, 20), 1024 + 100 * (i + 1), dtype=np.uint16) for i in range(len(positions_z))])
    ds.set_pixel_data(stored, photometric_interpretation="MONOCHROME2", bits_stored=12)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.7, 0.6]
    measures.SliceThickness = 2.5
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 40, 400
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelValueTransformationSequence = [transform]
    shared.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for z in positions_z:
        position = Dataset()
        position.ImagePositionPatient = [-10.0, -20.0, z]
        frame = Dataset()
        frame.PlanePositionSequence = [position]
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.save_as(path, enforce_file_format=True)
    return path, stored


def make_ct_slice(path: Path, z: float, series_uid: str, instance: int) -> Path:
    ds = _base_dataset(CT_STORAGE, "CT")
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.FrameOfReferenceUID = "1.2.3.4"
    ds.set_pixel_data(np.full((8, 8), 1000 + instance, dtype=np.uint16), "MONOCHROME2", 12)
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- real DICOM


def test_ct_slice_hu_spacing_window(ct_3slice):
    path = ct_3slice / "01.dcm"
    ds = pydicom.dcmread(path)
    image = read_slice(path)
    assert not image.is_volume and image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.pixels, apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    assert image.pixels.min() < -1000  # really in HU (air), not stored values
    assert image.spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert image.origin == (float(ds.ImagePositionPatient[1]), float(ds.ImagePositionPatient[0]))
    assert image.window == (40 - 0.5 - 399 / 2, 40 - 0.5 + 399 / 2)  # WC 40 / WW 400, DICOM LINEAR formula
    assert [d.SOPInstanceUID for d in image.dicom] == [ds.SOPInstanceUID]
    assert image.slice_at(0) is image


def test_ct_folder_is_a_sorted_stack_aligned_with_nrrd_labels(ct_3slice):
    # the folder also holds a DICOM SEG, NRRD label maps and a LICENSE: only the CT series is read
    stack = read_slice(ct_3slice)
    assert stack.is_volume and stack.shape == (3, 512, 512)
    positions_z = [float(d.ImagePositionPatient[2]) for d in stack.dicom]
    assert positions_z == sorted(positions_z)  # ascending along the normal, as ITK orders it
    assert [Path(d.filename).name for d in stack.dicom] == ["03.dcm", "02.dcm", "01.dcm"]
    labels = sitk.ReadImage(str(ct_3slice / "liver_seg.nrrd"))
    np.testing.assert_allclose(stack.spacing, labels.GetSpacing()[::-1], atol=1e-6)
    np.testing.assert_allclose(stack.origin, labels.GetOrigin()[::-1], atol=1e-4)
    np.testing.assert_allclose(stack.direction, np.eye(3))
    ds01 = pydicom.dcmread(ct_3slice / "01.dcm")
    np.testing.assert_array_equal(stack.pixels[2], apply_modality_lut(ds01.pixel_array, ds01))
    plane = stack.slice_at(2)
    assert plane.shape == (512, 512) and plane.dicom[0].SOPInstanceUID == ds01.SOPInstanceUID
    assert plane.origin == pytest.approx((float(ds01.ImagePositionPatient[1]), float(ds01.ImagePositionPatient[0])))
    with pytest.raises(IndexError):
        stack.slice_at(3)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_pydicom_test_files(name):
    path = Path(get_testdata_file(name))
    ds = pydicom.dcmread(path)
    image = read_slice(path)
    np.testing.assert_array_equal(image.pixels, apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    assert image.spacing == tuple(float(v) for v in ds.PixelSpacing)
    if "WindowCenter" in ds:
        center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        assert image.window == (center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)


# ----------------------------------------------------------------------------- generated DICOM


def test_monochrome1_is_inverted_with_its_window(tmp_path):
    path, stored = make_monochrome1_dx(tmp_path / "dx.dcm")
    image = read_slice(path)
    np.testing.assert_array_equal(image.pixels, 4095.0 - stored)  # reflected in the 12-bit range
    assert image.pixels[15, 10] > image.pixels[0, 0]  # bone brighter than air
    low, high = 1000 - 0.5 - 250, 1000 - 0.5 + 250
    assert image.window == (4095 - high, 4095 - low)
    assert image.spacing == (0.139, 0.143)  # ImagerPixelSpacing for projection X-ray
    assert image.origin == (0.0, 0.0)


def test_enhanced_multiframe_sorted_with_frame_numbers(tmp_path):
    path, stored = make_enhanced_ct(tmp_path / "mf.dcm")
    image = read_slice(path)
    assert image.shape == (3, 16, 20)
    assert image.frame_numbers == (3, 2, 1)  # z = 0.0, 2.5, 5.0
    np.testing.assert_array_equal(image.pixels, stored[::-1].astype(np.float32) - 1024)
    assert image.spacing == (2.5, 0.7, 0.6)
    assert image.origin == (0.0, -20.0, -10.0)
    assert image.window == (-160.0, 239.0)
    plane = image.slice_at(1)
    assert plane.frame_numbers == (2,) and plane.dicom[0] is image.dicom[0]


def test_legacy_multiframe_positions_follow_the_normal(tmp_path):
    ds = _base_dataset(CT_STORAGE, "CT")
    ds.set_pixel_data(np.arange(2 * 6 * 4, dtype=np.uint16).reshape(2, 6, 4), "MONOCHROME2", 12)
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [1.0, 2.0, 3.0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.25], 4.0
    ds.save_as(tmp_path / "legacy.dcm", enforce_file_format=True)
    image = read_slice(tmp_path / "legacy.dcm")
    assert image.shape == (2, 6, 4) and image.frame_numbers == (1, 2)
    assert image.spacing == (4.0, 0.5, 0.25) and image.origin == (3.0, 2.0, 1.0)


def test_folder_with_two_series_names_them_and_series_uid_picks_one(tmp_path):
    series_a, series_b = generate_uid(), generate_uid()
    for i in range(2):
        make_ct_slice(tmp_path / f"a{i}.dcm", z=float(i), series_uid=series_a, instance=i + 1)
        make_ct_slice(tmp_path / f"b{i}.dcm", z=float(i), series_uid=series_b, instance=i + 1)
    with pytest.raises(UnsupportedImageError, match="2 DICOM image series") as info:
        read_slice(tmp_path)
    assert series_a in str(info.value) and series_b in str(info.value) and "series_uid=" in str(info.value)
    image = read_slice(tmp_path, series_uid=series_b)
    assert image.shape == (2, 8, 8) and {d.SeriesInstanceUID for d in image.dicom} == {series_b}


def test_same_position_twice_is_refused(tmp_path):
    series = generate_uid()
    make_ct_slice(tmp_path / "a.dcm", z=0.0, series_uid=series, instance=1)
    make_ct_slice(tmp_path / "b.dcm", z=0.0, series_uid=series, instance=2)
    with pytest.raises(UnsupportedImageError, match="same position"):
        read_slice(tmp_path)


# ----------------------------------------------------------------------------- PNG / TIFF


def test_png_16bit_keeps_values(tmp_path):
    values = (np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)
    skimage.io.imsave(tmp_path / "a.png", values, check_contrast=False)
    image = read_slice(tmp_path / "a.png")
    np.testing.assert_array_equal(image.pixels, values.astype(np.float32))
    assert values.max() > 255 and image.spacing == (1.0, 1.0) and image.window is None and image.dicom == []


def test_rgb_png_gray_rule(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    skimage.io.imsave(tmp_path / "same.png", np.stack([gray] * 3, axis=-1), check_contrast=False)
    np.testing.assert_array_equal(read_slice(tmp_path / "same.png").pixels, gray)  # identical channels: lossless
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    skimage.io.imsave(tmp_path / "colour.png", rgb, check_contrast=False)
    expected = 0.2125 * 200 + 0.7154 * 100 + 0.0721 * 50
    np.testing.assert_allclose(read_slice(tmp_path / "colour.png").pixels, expected, rtol=1e-6)


def test_rgba_png_opaque_is_read_transparent_is_refused(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (10, 12), dtype=np.uint8)
    rgba = np.stack([gray, gray, gray, np.full_like(gray, 255)], axis=-1)
    skimage.io.imsave(tmp_path / "opaque.png", rgba, check_contrast=False)
    np.testing.assert_array_equal(read_slice(tmp_path / "opaque.png").pixels, gray)
    rgba[0, 0, 3] = 10
    skimage.io.imsave(tmp_path / "alpha.png", rgba, check_contrast=False)
    with pytest.raises(UnsupportedImageError, match=r"alpha\.png.*1 of 120 pixels not fully opaque"):
        read_slice(tmp_path / "alpha.png")


def test_multipage_tiff_is_a_stack_and_odd_channels_are_refused(tmp_path):
    pages = np.arange(3 * 5 * 6, dtype=np.uint16).reshape(3, 5, 6)
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="minisblack")
    image = read_slice(tmp_path / "pages.tif")
    assert image.is_volume
    np.testing.assert_array_equal(image.pixels, pages)
    tifffile.imwrite(tmp_path / "planar.tif", pages, photometric="rgb", planarconfig="separate")
    expected = np.tensordot([0.2125, 0.7154, 0.0721], pages.astype(np.float64), axes=1)
    np.testing.assert_allclose(read_slice(tmp_path / "planar.tif").pixels, expected, rtol=1e-6)  # samples first
    five = np.zeros((5, 6, 5), np.uint8)
    tifffile.imwrite(tmp_path / "five.tif", five, photometric="minisblack", planarconfig="contig")
    with pytest.raises(UnsupportedImageError, match=r"five\.tif.*5 channels"):
        read_slice(tmp_path / "five.tif")


# ----------------------------------------------------------------------------- NIfTI / NRRD


def test_nifti_2d_geometry_in_array_order(tmp_path):
    array = np.arange(6 * 9, dtype=np.int16).reshape(6, 9)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.8))  # (x, y) = (columns, rows)
    image.SetOrigin((10.0, -4.0))
    sitk.WriteImage(image, str(tmp_path / "plane.nii.gz"))
    read = read_slice(tmp_path / "plane.nii.gz")
    np.testing.assert_array_equal(read.pixels, array)
    assert read.spacing == pytest.approx((0.8, 0.5)) and read.origin == pytest.approx((-4.0, 10.0))
    assert read.name == "plane"


def test_nifti_3d_physical_points_match_simpleitk(tmp_path):
    array = np.random.default_rng(2).integers(0, 100, (4, 5, 6)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.6, 0.7, 2.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))  # rotated in-plane
    sitk.WriteImage(image, str(tmp_path / "vol.nii"))
    read = read_slice(tmp_path / "vol.nii")
    np.testing.assert_array_equal(read.pixels, array)
    stored = sitk.ReadImage(str(tmp_path / "vol.nii"))
    for index in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:  # array order (z, y, x)
        physical = np.asarray(read.origin) + read.direction @ (np.asarray(read.spacing) * index)
        expected = stored.TransformIndexToPhysicalPoint(tuple(int(i) for i in index[::-1]))[::-1]
        np.testing.assert_allclose(physical, expected, atol=1e-4)
    with pytest.raises(UnsupportedImageError, match=r"vol\.nii.*stack of 4 slices"):
        read_slice(tmp_path / "vol.nii", expect_2d=True)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("keep", [0.5, 600 / 526474, 140 / 526474])  # in the pixels, in the header, no elements
def test_truncated_dicom(tmp_path, ct_3slice, keep):
    data = (ct_3slice / "01.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: round(len(data) * keep)])
    with pytest.raises(ImageReadError, match=r"cut\.dcm.*truncated"):
        read_slice(tmp_path / "cut.dcm")


def test_dicom_without_pixel_data(tmp_path):
    ds = _base_dataset("1.2.840.10008.5.1.4.1.1.88.11", "SR")  # Basic Text SR: a report, no image
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"report\.dcm: the DICOM file \(Basic Text SR Storage\) holds no pixel"):
        read_slice(tmp_path / "report.dcm")


def test_dicom_seg_is_not_an_image(ct_3slice):
    with pytest.raises(UnsupportedImageError, match=r"liver\.dcm.*Segmentation"):
        read_slice(ct_3slice / "liver.dcm")


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("notes.dcm", b"this is a text file, not DICOM\n" * 10, ImageReadError, "not a DICOM file"),
        ("empty.png", b"", ImageReadError, r"empty \(0 bytes\)"),
        ("broken.png", b"\x89PNG\r\n\x1a\n garbage", ImageReadError, "not a readable PNG"),
        ("image.xyz", b"data", UnsupportedImageError, "unsupported file type '.xyz'"),
        ("broken.nii.gz", b"not a nifti", ImageReadError, "not a readable NIfTI"),
    ],
)
def test_bad_files_name_file_and_problem(tmp_path, name, content, error, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=message) as info:
        read_slice(tmp_path / name)
    assert name in str(info.value)


def test_image_of_size_zero(tmp_path):
    with pytest.warns(UserWarning):  # tifffile warns that a zero-size TIFF is nonconformant
        tifffile.imwrite(tmp_path / "zero.tif", np.zeros((0, 4), np.uint8))
    with pytest.raises(ImageReadError, match=r"zero\.tif.*size 0"):
        read_slice(tmp_path / "zero.tif")


def test_missing_path_and_folders_without_dicom(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_slice(tmp_path / "absent.dcm")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ImageReadError, match="no DICOM image files"):
        read_slice(tmp_path)


def test_stack_where_2d_expected(ct_3slice, tmp_path):
    with pytest.raises(UnsupportedImageError, match="stack of 3 slices"):
        read_slice(ct_3slice, expect_2d=True)
    shutil.copy(ct_3slice / "01.dcm", tmp_path / "IM0001")  # no extension: recognised by the DICM marker
    assert read_slice(tmp_path / "IM0001", expect_2d=True).shape == (512, 512)


# ----------------------------------------------------------------------------- NaN / infinite pixels


def _with_non_finite(value: float, shape=(8, 8), dtype=np.float32) -> np.ndarray:
    array = np.ones(shape, dtype=dtype)
    array.flat[5] = value
    return array


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["scan.nii", "scan.nii.gz", "scan.nrrd", "scan.mha"])
def test_volumes_with_non_finite_pixels_are_refused(tmp_path, name, value):
    # SimpleITK's own NIfTI reader turns these voxels into 0; the refusal must come anyway
    sitk.WriteImage(sitk.GetImageFromArray(_with_non_finite(value)), str(tmp_path / name))
    with pytest.raises(ImageReadError, match=rf"{name}: 1 of 64 pixels are NaN or infinite"):
        read_slice(tmp_path / name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nifti_stack_with_nan_in_a_later_plane_is_refused_and_finite_one_reads(tmp_path, dtype):
    stack = np.ones((3, 6, 5), dtype=dtype)
    sitk.WriteImage(sitk.GetImageFromArray(stack), str(tmp_path / "ok.nii.gz"))
    assert read_slice(tmp_path / "ok.nii.gz").shape == (3, 6, 5)
    stack[2, 5, 4] = np.nan  # the very last voxel: the raw check must read the whole data block
    sitk.WriteImage(sitk.GetImageFromArray(stack), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(ImageReadError, match=r"bad\.nii\.gz: 1 of 90 pixels"):
        read_slice(tmp_path / "bad.nii.gz")


def test_float_tiff_with_nan_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "map.tif", _with_non_finite(np.nan))
    with pytest.raises(ImageReadError, match=r"map\.tif: 1 of 64 pixels are NaN or infinite"):
        read_slice(tmp_path / "map.tif")


def test_float_dicom_with_nan_is_refused_naming_the_file(tmp_path):
    ds = _base_dataset(CT_STORAGE, "CT")
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 8, 8, 1, 32
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.FloatPixelData = _with_non_finite(np.nan).tobytes()
    folder = tmp_path / "series"
    folder.mkdir()
    ds.save_as(folder / "IM0007", enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"IM0007: 1 of 64 pixels are NaN or infinite"):
        read_slice(folder)  # through the folder reader too: the message names the file, not only the folder
