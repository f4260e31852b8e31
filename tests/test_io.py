"""Reading every image folder of ../shared/data, and one-line InputErrors for inputs we cannot use."""

import hashlib
import logging
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders import JPEG2000LosslessDecoder

from diffdenoise.errors import InputError
from diffdenoise.io import read_volumes, scan_volumes


@pytest.fixture(scope="module")
def read(shared_data):
    """Reads a folder of the shared data once per module: ``read("head_ct_ge/series")``."""
    cache = {}

    def _read(relative):
        if relative not in cache:
            cache[relative] = read_volumes(shared_data / relative)
        return cache[relative]

    return _read


def _only(volumes):
    assert len(volumes) == 1, [v.volume_id for v in volumes]
    return volumes[0]


def test_studyforrest_series_is_one_axial_volume(read):
    volume = _only(read("brain_mri_t1_axial_studyforrest/series"))
    assert volume.array.shape == (64, 384, 274)  # Rows x Columns per slice, 64 slices along Z
    assert volume.array.dtype == np.float32 and volume.modality == "mri"
    assert len(volume.meta["files"]) == 64 and len(volume.meta["ImagePositionPatient"]) == 64
    assert np.all(np.diff(volume.meta["slice_positions_mm"]) > 0)
    assert volume.meta["spacing"][0] == pytest.approx(0.667, abs=1e-3)


def test_sagittal_siemens_series(read):
    volume = _only(read("brain_mri_t1_sagittal_siemens/series"))
    assert volume.array.shape == (35, 256, 256)
    assert volume.meta["BitsStored"] == 12 and volume.meta["spacing"][0] == pytest.approx(4.8, abs=0.01)


def test_head_ct_in_hu_sorted_despite_tilt_and_uneven_spacing(read):
    volume = _only(read("head_ct_ge/series"))
    assert volume.array.shape == (28, 512, 512) and volume.modality == "ct"
    air = volume.array[(volume.array > -1400) & (volume.array < -500)]  # -1500 is padding outside the FOV
    assert np.median(air) == pytest.approx(-1000, abs=50)
    assert volume.meta["PixelPaddingValue"] == -1500
    steps = np.diff(volume.meta["slice_positions_mm"])
    assert np.all(steps > 0) and steps.max() - steps.min() > 5  # 1.08 / 4 / 7 mm gaps


def test_chest_xray_pngs_are_single_slices(read):
    volumes = read("chest_xray_mhh/png")
    assert len(volumes) == 120 and len({v.volume_id for v in volumes}) == 120
    assert all(v.array.shape[0] == 1 and v.array.shape[2] == 640 for v in volumes)
    assert all(v.modality == "other" and v.group == v.volume_id for v in volumes)
    assert max(v.array.max() for v in volumes) <= 255


def test_phantom_multiframe_files_are_separate_volumes(read):
    volumes = read("phantom_mri_epi_repeats/series")
    assert [v.volume_id for v in volumes] == ["0063", "0126", "0189", "0252", "0315"]  # one SeriesInstanceUID
    assert all(v.array.shape == (63, 86, 86) and v.group == "Funstar" for v in volumes)


def test_phantom_classic_series_matches_enhanced_volume(read):
    classic = _only(read("phantom_mri_epi_repeats/classic_volume2"))
    enhanced = read("phantom_mri_epi_repeats/series")[1]
    np.testing.assert_array_equal(classic.array, enhanced.array)
    assert classic.meta["slice_positions_mm"] == pytest.approx(enhanced.meta["slice_positions_mm"])


@pytest.mark.parametrize(
    "name, shape, modality",
    [
        ("693_UNCR", (1, 512, 512), "ct"),
        ("CT_small", (1, 128, 128), "ct"),
        ("MR-SIEMENS-DICOM-WithOverlays", (1, 484, 484), "mri"),
        ("MR2_UNCR", (1, 1024, 1024), "mri"),
        ("MR_small", (1, 64, 64), "mri"),
        ("RG3_J2KR", (1, 1760, 1760), "xray"),  # JPEG 2000 lossless, MONOCHROME1
        ("bad_sequence", (1, 512, 512), "ct"),  # JPEG lossless, UN-encoded sequence, invalid UIDs: readable
        ("eCT_Supplemental", (2, 512, 512), "ct"),  # Enhanced CT, rescale in functional groups
        ("emri_small", (10, 64, 64), "mri"),  # Enhanced MR without functional groups, empty PatientID
        ("explicit_VR-UN", (1, 512, 512), "ct"),  # JPEG 2000 lossless
    ],
)
def test_single_dicom_files(read, name, shape, modality):
    volume = {v.volume_id: v for v in read("dicom_single_files")}[name]
    assert volume.array.shape == shape and volume.modality == modality
    ds = pydicom.dcmread(volume.meta["files"][0])
    if ds.get("PhotometricInterpretation") == "MONOCHROME2":
        slope, intercept = volume.meta["rescale_slope_intercept"][0]
        expected = ds.pixel_array.reshape(shape)[volume.meta["frame_numbers"]] * slope + intercept
        np.testing.assert_allclose(volume.array, expected, rtol=1e-6)


def test_monochrome1_is_inverted_and_recorded(read):
    volume = {v.volume_id: v for v in read("dicom_single_files")}["RG3_J2KR"]
    raw = pydicom.dcmread(volume.meta["files"][0]).pixel_array
    assert volume.meta["PhotometricInterpretation"] == "MONOCHROME1" and volume.meta["monochrome1_inverted"]
    np.testing.assert_array_equal(volume.array[0], 1023 - raw)  # 10 bits stored


def test_enhanced_ct_rescale_from_functional_groups(read):
    volume = {v.volume_id: v for v in read("dicom_single_files")}["eCT_Supplemental"]
    assert volume.meta["rescale_slope_intercept"] == [[1.0, -1024.0]] * 2
    assert volume.array.min() == -1024


def test_nifti_slices_along_last_axis_keep_affine(read, shared_data):
    volumes = {v.volume_id: v for v in read("nifti_volumes")}
    assert sorted(volumes) == ["seg3D_MR", "stroke_FLAIR", "stroke_T1", "stroke_T2"]
    image = nib.load(shared_data / "nifti_volumes" / "seg3D_MR.nii.gz")
    volume = volumes["seg3D_MR"]
    assert volume.array.shape == (160, 160, 232)
    np.testing.assert_array_equal(volume.meta["affine"], image.affine)
    np.testing.assert_array_equal(volume.array[7], image.get_fdata(dtype=np.float32)[:, :, 7])


def test_12bit_mosaic_is_one_slice(read):
    volume = _only(read("dicom_12bit_edgecase"))
    assert volume.array.shape == (1, 384, 384) and volume.meta["BitsStored"] == 12
    assert 0 <= volume.array.min() and volume.array.max() <= 4095


def test_several_series_in_one_folder_found_by_content(tmp_path):
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / name.split(".")[0].lower())  # no extension
    (tmp_path / "notes.txt").write_text("not an image")
    volumes = read_volumes(tmp_path)
    assert [(v.volume_id, v.modality) for v in volumes] == [("ct_small", "ct"), ("mr_small", "mri")]


def test_16bit_png_and_multipage_tiff(tmp_path):
    pixels = np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) * 30
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    pages = [Image.fromarray(np.full((8, 8), v, dtype=np.uint8)) for v in (1, 2)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    volumes = {v.volume_id: v for v in read_volumes(tmp_path)}
    np.testing.assert_array_equal(volumes["wide"].array[0], pixels)
    assert volumes["stack"].array.shape == (2, 8, 8) and volumes["stack"].array[1, 0, 0] == 2


def test_reading_leaves_input_files_untouched(shared_data):
    folder = shared_data / "dicom_single_files"
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    read_volumes(folder)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digest} == digest


def _write_nifti(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4)), path)
    return path


def _write_mpeg2_dicom(path):
    """A DICOM whose transfer syntax no installed plugin decodes, like a JPEG 2000 file without pylibjpeg."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.save_as(path)
    return path


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda tmp: tmp / "nope", "nope: no such file or folder"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "empty: no images found"),
        (lambda tmp: get_testdata_file("reportsi.dcm"), r"reportsi\.dcm: DICOM SR object without pixel data"),
        (lambda tmp: get_testdata_file("MR_truncated.dcm"), r"MR_truncated\.dcm: cannot decode.*less than"),
        (lambda tmp: Image.new("RGB", (8, 8)).save(tmp / "rgb.png") or tmp / "rgb.png", r"rgb\.png: RGB"),
        (lambda tmp: _write_nifti(tmp / "fmri.nii.gz", np.zeros((4, 4, 3, 2))), r"fmri\.nii\.gz: 4D data"),
        (lambda tmp: _write_nifti(tmp / "nan.nii", np.full((4, 4, 2), np.nan)), r"nan\.nii: 32 NaN/Inf"),
        (lambda tmp: _write_mpeg2_dicom(tmp / "video.dcm"), r"video\.dcm: cannot decode .*MPEG2.*no decoder"),
    ],
    ids=["missing", "empty-folder", "sr", "truncated", "rgb-png", "4d-nifti", "nan", "no-decoder"],
)
def test_bad_input_names_file_and_problem(tmp_path, make, match):
    with pytest.raises(InputError, match=match) as error:
        read_volumes(make(tmp_path))
    assert "\n" not in str(error.value)


def test_missing_jpeg2000_decoder_says_what_to_install(shared_data, monkeypatch):
    monkeypatch.setattr(JPEG2000LosslessDecoder, "_available", {})  # as if pylibjpeg-openjpeg were absent
    with pytest.raises(InputError, match=r"RG3_J2KR\.dcm: cannot decode .*pip install pylibjpeg"):
        read_volumes(shared_data / "dicom_single_files" / "RG3_J2KR.dcm")


def test_folder_of_text_files_warns_then_fails(tmp_path, caplog):
    for name in ("README.md", "labels.csv"):
        (tmp_path / name).write_text("text")
    with caplog.at_level(logging.WARNING), pytest.raises(InputError, match=f"{tmp_path}: no images found"):
        scan_volumes(tmp_path)
    assert sum("skipped" in message for message in caplog.messages) == 2


def test_sr_inside_a_folder_is_skipped(tmp_path, caplog):
    shutil.copy(get_testdata_file("reportsi.dcm"), tmp_path)
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path)
    with caplog.at_level(logging.WARNING):
        assert [v.volume_id for v in read_volumes(tmp_path)] == ["MR_small"]
    assert any("reportsi.dcm: skipped, DICOM SR object without pixel data" in m for m in caplog.messages)
