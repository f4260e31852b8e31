"""Denoising scans end to end: each input format comes back in its own format, geometry and stored range,
less noisy, from a tiny BSN trained here on noisy studyforrest slices."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.inferers import SimpleInferer
from PIL import Image
from pydicom.data import get_testdata_file
from skimage.restoration import estimate_sigma

import diffdenoise.denoise
from conftest import REPO_ROOT
from diffdenoise.cli import main
from diffdenoise.data import normalise
from diffdenoise.denoise import Model, denoise, denoise_volume, load_model
from diffdenoise.errors import InputError
from diffdenoise.io import read_volumes
from diffdenoise.metrics import psnr
from diffdenoise.noise_level import estimate_noise_level
from diffdenoise.networks import BlindSpotNet

STUDYFORREST = "brain_mri_t1_axial_studyforrest/series"
NOISE_SIGMA = 15.0  # stored units; brain tissue is about 100-240 there
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness")


def write_bundle(root: Path, network: torch.nn.Module) -> tuple[Path, Path]:
    """A bundle folder as training leaves it: the shipped common.yaml, an overlay sizing the net, models/bsn.pt."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    shutil.copy(REPO_ROOT / "bundles" / "diffdenoise" / "configs" / "common.yaml", root / "configs")
    overlay = root / "configs" / "tiny.yaml"
    overlay.write_text("bsn_features: 16\nbsn_num_blocks: 2\n")
    torch.save(network.state_dict(), root / "models" / "bsn.pt")
    return root, overlay


def digest(path: Path) -> dict:
    """sha256 of every file under ``path`` (or of ``path``), to show inputs are never modified."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _add_noise(pixels: np.ndarray, rng) -> np.ndarray:
    return pixels + rng.normal(0.0, NOISE_SIGMA, pixels.shape)


@pytest.fixture(scope="module")
def bundle(shared_data, tmp_path_factory):
    """A BlindSpotNet(16, 2) trained 200 Adam steps on 32x32 crops of two noisy studyforrest slices (~10 s)."""
    rng = np.random.default_rng(0)
    slices = [pydicom.dcmread(shared_data / STUDYFORREST / f"N2D_{n:04d}.dcm").pixel_array for n in (180, 200)]
    noisy = torch.from_numpy(normalise(_add_noise(np.stack(slices).astype(np.float32), rng), "mri"))[:, None]
    torch.manual_seed(0)
    network = BlindSpotNet(features=16, num_blocks=2)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    for _ in range(200):
        rows = torch.randint(0, noisy.shape[2] - 32, (8,))
        cols = torch.randint(0, noisy.shape[3] - 32, (8,))
        batch = torch.stack([noisy[i % 2, :, r : r + 32, c : c + 32] for i, (r, c) in enumerate(zip(rows, cols))])
        loss = torch.nn.functional.mse_loss(network(batch), batch)  # blind spot: the target is the input
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return write_bundle(tmp_path_factory.mktemp("trained") / "bundle", network)


@pytest.fixture(scope="module")
def noisy_series(shared_data, tmp_path_factory):
    """Six studyforrest slices (not the training ones) with Gaussian noise, rewritten with pydicom; and the clean."""
    folder = tmp_path_factory.mktemp("noisy") / "series"
    folder.mkdir()
    rng, clean = np.random.default_rng(1), []
    for n in range(188, 194):
        ds = pydicom.dcmread(shared_data / STUDYFORREST / f"N2D_{n:04d}.dcm")
        clean.append(ds.pixel_array.astype(np.float32))
        ds.PixelData = np.rint(_add_noise(clean[-1], rng)).astype(np.int16).tobytes()
        ds.save_as(folder / f"N2D_{n:04d}.dcm")
    return folder, np.stack(clean)


def _denoise(src, out, bundle, **kwargs):
    path, overlay = bundle
    return denoise(src, out, bundle=path, config=[str(overlay)], device="cpu", progress=False, **kwargs)


@pytest.fixture
def identity(monkeypatch):
    """Replaces the model by the identity, so any change in the stored pixels comes from the intensity round trip."""
    model = Model("bsn", torch.nn.Identity(), SimpleInferer(), torch.device("cpu"), Path("identity.pt"), "0" * 64, [])
    monkeypatch.setattr(diffdenoise.denoise, "load_model", lambda *args, **kwargs: model)


def test_dicom_series_becomes_a_less_noisy_derived_series(noisy_series, bundle, tmp_path, capsys):
    src, clean = noisy_series
    before = digest(src)
    path, overlay = bundle
    assert main(["denoise", str(src), str(tmp_path / "out"), "--bundle", str(path), "--config", str(overlay),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert digest(src) == before
    (volume,) = read_volumes(src)
    (folder,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in src.iterdir())
    pairs = [(pydicom.dcmread(src / p.name), pydicom.dcmread(p)) for p in sorted(folder.iterdir())]
    new_series = {b.SeriesInstanceUID for _, b in pairs}
    assert len(new_series) == 1 and volume.meta["SeriesInstanceUID"] not in new_series
    assert len({b.SOPInstanceUID for _, b in pairs} | {a.SOPInstanceUID for a, _ in pairs}) == 2 * len(pairs)
    for a, b in pairs:
        assert list(b.ImageType[:2]) == ["DERIVED", "SECONDARY"] and b.SeriesDescription == "anat-T1w [diffdenoise]"
        assert all(a.get(k) == b.get(k) for k in (*GEOMETRY, "PatientID", "StudyInstanceUID", "FrameOfReferenceUID"))
        assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID  # uncompressed input keeps its syntax
        assert b.pixel_array.dtype == a.pixel_array.dtype and "bsn" in b.DerivationDescription
    (result,) = read_volumes(folder)
    assert result.array.shape == volume.array.shape == clean.shape
    assert result.meta["slice_positions_mm"] == pytest.approx(volume.meta["slice_positions_mm"])

    sigma = [np.mean([estimate_sigma(s) for s in normalise(v, "mri")]) for v in (volume.array, result.array)]
    brain = clean > 20
    rmse = [np.sqrt(np.mean((v[brain] - clean[brain]) ** 2)) for v in (volume.array, result.array)]
    assert sigma[1] < 0.5 * sigma[0] and rmse[1] < 0.8 * rmse[0], (sigma, rmse)
    report = json.loads((tmp_path / "out" / f"{folder.name}.json").read_text())
    assert report["noise_sigma_after"] < 0.5 * report["noise_sigma_before"] and report["slices"] == 6
    assert report["mode"] == "bsn" and report["model_sha256"] == digest(path / "models" / "bsn.pt").popitem()[1]
    assert {report["SeriesInstanceUID"]} == new_series and report["output"] == str(folder.resolve())
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "out") and "no better than the input" not in captured.err

    # the report's no-reference estimate of the gain (SURE, sigma measured on the slices), on the normalised slices
    # the model saw. The measured sigma is the total noise: the added noise and the scan's own (measured on the
    # clean slices), so the estimate scores against an image without either, and exceeds the gain measured
    # against the scan, which holds its own noise (test_quality checks the estimate where the level is known)
    quality = report["quality"]
    low, high = report["intensity_range"]
    true_gain = np.mean([psnr(*(np.clip((v - low) / (high - low), 0, 1) for v in (out, ref))) -
                         psnr(*(np.clip((v - low) / (high - low), 0, 1) for v in (noisy, ref)))
                         for noisy, out, ref in zip(volume.array, result.array, clean)])
    native = estimate_noise_level(list(np.clip((clean - low) / (high - low), 0, 1)), "gaussian")
    assert quality["estimate_slices"] == 6 and quality["noise_model"] == "gaussian"
    assert quality["noise_level"] == pytest.approx(np.hypot(NOISE_SIGMA / (high - low), native), rel=0.03)
    assert true_gain > 5.0 and true_gain < quality["estimated_gain_db"] < true_gain + 1.5, (quality, true_gain)


def test_an_output_estimated_worse_than_its_input_is_flagged_on_stderr(noisy_series, monkeypatch, tmp_path, capsys):
    """Unsharp masking amplifies the noise: the report's estimate says so, and one line on stderr."""
    sharpen = torch.nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect", bias=False)
    with torch.no_grad():
        sharpen.weight.copy_(torch.tensor([[0, -0.5, 0], [-0.5, 3.0, -0.5], [0, -0.5, 0]]).view(1, 1, 3, 3))
    model = Model("bsn", sharpen.eval(), SimpleInferer(), torch.device("cpu"), Path("sharpen.pt"), "0" * 64, [])
    monkeypatch.setattr(diffdenoise.denoise, "load_model", lambda *args, **kwargs: model)
    src, _ = noisy_series
    denoise(src, tmp_path / "out", progress=False)
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert report["quality"]["estimated_gain_db"] < -1.0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "the 'bsn' output is estimated no better than the input" in line and report["volume_id"] in line
    denoise(src, tmp_path / "skipped", progress=False, estimate_slices=0)
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / "skipped").glob("*.json")]
    assert report["quality"] == {"skipped": "estimate_slices is 0"} and not capsys.readouterr().err


def test_uncertainty_map_is_its_own_derived_series_and_larger_where_the_error_is(noisy_series, bundle, tmp_path):
    """--uncertainty: stage 1's posterior std beside the output, a DICOM series of its own in the input's geometry,
    its mean in the report; where the map says the posterior is unsure, the output is further from the clean scan."""
    src, clean = noisy_series
    path, overlay = bundle
    assert main(["denoise", str(src), str(tmp_path / "out"), "--bundle", str(path), "--config", str(overlay),
                 "--device", "cpu", "--mode", "bsn", "--uncertainty"]) == 0  # fmt: skip
    (report_path,) = (tmp_path / "out").glob("*.json")
    report = json.loads(report_path.read_text())
    folder = Path(report["uncertainty"]["output"])
    assert folder.name == f"{report['volume_id']}_uncertainty" and folder.is_dir()
    (source,), (output,), (std,) = (read_volumes(p) for p in (src, Path(report["output"]), folder))
    maps = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    uids = {ds.SeriesInstanceUID for ds in maps}
    assert uids == {report["uncertainty"]["SeriesInstanceUID"]}
    assert not uids & {report["SeriesInstanceUID"], source.meta["SeriesInstanceUID"]}
    assert all(ds.SeriesDescription == "anat-T1w [diffdenoise std]" and "posterior std" in ds.DerivationDescription
               for ds in maps)
    assert std.meta["slice_positions_mm"] == pytest.approx(source.meta["slice_positions_mm"])
    assert std.array.shape == clean.shape and std.array.min() >= 0
    # stored rounded to the input's integer step: the report's mean is of the unrounded map
    assert report["uncertainty"]["mean_std"] == pytest.approx(std.array.mean(), abs=0.5)
    # under the noise (a posterior is never wider than the likelihood), above nothing
    assert 1.0 < report["uncertainty"]["mean_std"] < NOISE_SIGMA
    error = np.abs(output.array - clean)
    brain = clean > 20
    unsure = std.array >= np.quantile(std.array[brain], 0.75)
    sure = std.array <= np.quantile(std.array[brain], 0.25)
    # measured at writing: 6.70 vs 5.30 (x1.26) for this box-prior net; the clean scan's own noise is in both
    assert error[brain & unsure].mean() > 1.15 * error[brain & sure].mean()


def test_uncertainty_needs_a_posterior_and_leaves_no_output(noisy_series, monkeypatch, tmp_path):
    model = Model("student", torch.nn.Identity(), SimpleInferer(), torch.device("cpu"), Path("model.pt"), "0" * 64, [])
    monkeypatch.setattr(diffdenoise.denoise, "load_model", lambda *args, **kwargs: model)
    with pytest.raises(InputError, match=r"--uncertainty: needs --mode bsn.*mode 'student' gives one estimate"):
        denoise(noisy_series[0], tmp_path / "out", progress=False, uncertainty=True)
    assert not (tmp_path / "out").exists()


def test_nifti_uncertainty_keeps_the_affine(shared_data, bundle, tmp_path):
    image = nib.load(shared_data / "nifti_volumes" / "stroke_T1.nii.gz")
    src = tmp_path / "in" / "stroke.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[30:94, 40:120, 60:63], image.affine, image.header), src)
    _denoise(src, tmp_path / "out", bundle, mode="bsn", uncertainty=True)
    before, std = nib.load(src), nib.load(tmp_path / "out" / "stroke_uncertainty.nii.gz")
    assert std.shape == before.shape and np.array_equal(std.affine, before.affine)
    report = json.loads((tmp_path / "out" / "stroke.json").read_text())
    (low, high), x, values = report["intensity_range"], before.get_fdata(), std.get_fdata()
    inside = (x >= low) & (x <= high)
    assert np.all(values[~inside] == 0) and (~inside).any() and values.min() >= 0  # passed through: no posterior
    assert report["uncertainty"]["mean_std"] == pytest.approx(values[inside].mean(), rel=1e-4)
    assert report["uncertainty"]["prior"] == "box"


def test_nifti_keeps_affine_header_and_shape(shared_data, bundle, tmp_path):
    image = nib.load(shared_data / "nifti_volumes" / "stroke_T1.nii.gz")
    src = tmp_path / "in" / "stroke.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[30:94, 40:120, 60:63], image.affine, image.header), src)
    _denoise(src, tmp_path / "out", bundle)
    before, after = nib.load(src), nib.load(tmp_path / "out" / "stroke.nii.gz")
    assert after.shape == before.shape and np.array_equal(after.affine, before.affine)
    assert after.header.get_zooms() == before.header.get_zooms() and after.get_data_dtype() == np.float32
    for code in ("qform_code", "sform_code"):
        assert after.header[code] == before.header[code]
    x, y = before.get_fdata(), after.get_fdata()
    high = json.loads((tmp_path / "out" / "stroke.json").read_text())["intensity_range"][1]
    assert np.array_equal(y[x > high], x[x > high]) and (x > high).any()  # clipped by normalisation: passed through
    assert not np.array_equal(y, x)


def test_multiframe_phantom_stays_multiframe_with_its_frame_geometry(shared_data, bundle, tmp_path):
    src = shared_data / "phantom_mri_epi_repeats" / "series" / "0126.dcm"
    _denoise(src, tmp_path / "out", bundle)
    a, b = pydicom.dcmread(src), pydicom.dcmread(tmp_path / "out" / "0126.dcm")
    assert b.NumberOfFrames == a.NumberOfFrames == 63 and b.SOPClassUID == a.SOPClassUID
    assert b.SOPInstanceUID != a.SOPInstanceUID and b.SeriesInstanceUID != a.SeriesInstanceUID
    for fa, fb in zip(a.PerFrameFunctionalGroupsSequence, b.PerFrameFunctionalGroupsSequence):
        assert fb.PlanePositionSequence[0].ImagePositionPatient == fa.PlanePositionSequence[0].ImagePositionPatient
        assert fb.MRImageFrameTypeSequence[0].FrameType[0] == "DERIVED"
    assert b.SharedFunctionalGroupsSequence == a.SharedFunctionalGroupsSequence
    (before,), (after,) = read_volumes(src), read_volumes(tmp_path / "out" / "0126.dcm")
    assert after.array.shape == before.array.shape and not np.array_equal(after.array, before.array)
    assert after.meta["slice_positions_mm"] == pytest.approx(before.meta["slice_positions_mm"])


def test_multiframe_files_of_one_series_stay_one_derived_series(shared_data, tmp_path, identity):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("0189.dcm", "0252.dcm"):  # two repeats, one SeriesInstanceUID
        shutil.copy(shared_data / "phantom_mri_epi_repeats" / "series" / name, src)
    denoise(src, tmp_path / "out", progress=False)
    written = [pydicom.dcmread(tmp_path / "out" / name, stop_before_pixels=True) for name in ("0189.dcm", "0252.dcm")]
    assert len({ds.SeriesInstanceUID for ds in written}) == 1 and len({ds.SOPInstanceUID for ds in written}) == 2
    assert written[0].SeriesInstanceUID != pydicom.dcmread(src / "0189.dcm", stop_before_pixels=True).SeriesInstanceUID


@pytest.mark.parametrize(
    "relative",
    [
        "dicom_single_files/RG3_J2KR.dcm",  # JPEG 2000, MONOCHROME1, 10 bits stored
        "dicom_single_files/eCT_Supplemental.dcm",  # Enhanced CT, rescale in functional groups
        "head_ct_ge/series/01.dcm",  # signed HU with padding -1500
        "dicom_12bit_edgecase/12bitUnsigned.dcm",
    ],
)
def test_identity_model_round_trips_dicom_stored_values(shared_data, tmp_path, identity, relative):
    """Normalising, denoising by the identity and writing back gives the input's stored pixels, bit for bit."""
    src = shared_data / relative
    denoise(src, tmp_path / "out", progress=False)
    a, b = pydicom.dcmread(src), pydicom.dcmread(tmp_path / "out" / src.name)
    np.testing.assert_array_equal(b.pixel_array, a.pixel_array)
    for keyword in ("PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope"):
        assert b.get(keyword) == a.get(keyword), keyword
    assert b.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian  # compressed in, uncompressed out


def test_identity_model_round_trips_png_tiff_and_nifti(tmp_path, identity):
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    pixels16 = rng.integers(0, 65535, (40, 48), dtype=np.uint16)
    Image.fromarray(pixels16).save(src / "wide.png")
    pages = [Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)) for _ in range(3)]
    pages[0].save(src / "stack.tif", save_all=True, append_images=pages[1:])
    nifti = rng.integers(-50, 900, (20, 24, 3)).astype(np.int16)
    nib.save(nib.Nifti1Image(nifti, np.diag([0.5, 0.6, 2.0, 1.0])), src / "scan.nii")
    denoise(src, tmp_path / "out", progress=False)
    with Image.open(tmp_path / "out" / "wide.png") as png:
        assert png.mode == "I;16" and np.array_equal(np.array(png), pixels16)
    with Image.open(tmp_path / "out" / "stack.tif") as tif:
        assert tif.n_frames == 3 and tif.mode == "L" and np.array_equal(np.array(tif), np.array(pages[0]))
    out = nib.load(tmp_path / "out" / "scan.nii")  # float32 out: exact up to float32 rounding
    np.testing.assert_allclose(out.get_fdata(), nifti, atol=1e-3)
    assert np.array_equal(out.affine, nib.load(src / "scan.nii").affine)


def test_ct_keeps_hu_outside_the_window(shared_data, bundle, tmp_path):
    src = shared_data / "head_ct_ge" / "series" / "01.dcm"
    _denoise(src, tmp_path / "out", bundle)
    a, b = pydicom.dcmread(src).pixel_array, pydicom.dcmread(tmp_path / "out" / "01.dcm").pixel_array  # HU: slope 1
    outside = (a < -100) | (a > 200)
    assert outside.mean() > 0.5 and np.array_equal(b[outside], a[outside])  # air, bone, -1500 padding untouched
    assert not np.array_equal(b[~outside], a[~outside]) and b[~outside].min() >= -100 and b[~outside].max() <= 200
    report = json.loads((tmp_path / "out" / "01.json").read_text())
    assert report["intensity_range"] == [-100.0, 200.0] and report["voxels_passed_through"] == outside.sum()


def test_folder_of_two_inputs_gives_two_outputs_and_reports_and_overwrite_replaces(bundle, tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    smooth = np.add.outer(np.arange(48), np.arange(64)).astype(float)  # a ramp, 0..110
    Image.fromarray(np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)).save(src / "a.png")
    ramp16 = np.clip(smooth * 500 + rng.normal(0, 3000, smooth.shape), 0, 65535).astype(np.uint16)
    Image.fromarray(ramp16).save(src / "b.tif")
    before = digest(src)
    out = tmp_path / "out"
    _denoise(src, out, bundle)
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.png", "b.json", "b.tif"]
    assert [Image.open(out / name).mode for name in ("a.png", "b.tif")] == ["L", "I;16"]
    for name in "ab":
        report = json.loads((out / f"{name}.json").read_text())
        assert report["noise_sigma_after"] < report["noise_sigma_before"], name

    path, overlay = bundle
    args = ["denoise", str(src), str(out), "--bundle", str(path), "--config", str(overlay), "--device", "cpu"]
    (out / "marker").write_text("from an earlier run")
    assert main(args) == 2
    problem = "output already exists; replace it with --overwrite or pick a new folder"
    assert capsys.readouterr().err.strip() == f"diffdenoise: error: {out}: {problem}"
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.png", "b.json", "b.tif"]
    assert digest(src) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_failure_midway_leaves_no_partial_output(tmp_path, identity, monkeypatch, existing):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(src / f"{name}.png")
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("earlier results")
    written = []
    real = diffdenoise.denoise.write_volume

    def write_then_fail(*args, **kwargs):
        if written:
            raise OSError("disk full")
        written.append(real(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(diffdenoise.denoise, "write_volume", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        denoise(src, out, overwrite=existing, progress=False)
    assert written  # the first volume was written, into the temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in", "out"] if existing else ["in"])
    if existing:
        assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_several_series_in_one_folder_each_or_one_chosen(tmp_path, identity):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), src / name)
    denoise(src, tmp_path / "all", progress=False)
    names = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert names == ["CT_small.dcm", "CT_small.json", "MR_small.dcm", "MR_small.json"]
    uid = str(pydicom.dcmread(src / "MR_small.dcm").SeriesInstanceUID)
    denoise(src, tmp_path / "mr", series=uid, progress=False)
    assert sorted(p.name for p in (tmp_path / "mr").iterdir()) == ["MR_small.dcm", "MR_small.json"]
    assert json.loads((tmp_path / "mr" / "MR_small.json").read_text())["source_SeriesInstanceUID"] == uid
    with pytest.raises(InputError, match=rf"no DICOM series with SeriesInstanceUID 1\.2\.3; found: .*{re.escape(uid)}"):
        denoise(src, tmp_path / "none", series="1.2.3", progress=False)


def test_modes_need_their_checkpoint_and_the_training_overlay(bundle, tmp_path):
    path, overlay = bundle
    with pytest.raises(InputError, match=r"mode 'student' needs models/model\.pt \(train stage 4 first\)"):
        load_model(path, "student", "cpu")
    with pytest.raises(InputError, match=r"mode 'srds' needs models/diffusion\.pt \(train stage 2 first\)"):
        load_model(path, "srds", "cpu")
    with pytest.raises(InputError, match=r"bsn\.pt: does not fit `bsn_def` .* --config presets/cpu"):
        load_model(path, "bsn", "cpu")  # without the overlay the configs build a 48-feature net
    assert load_model(path, None, "cpu", [str(overlay)]).mode == "bsn"  # no model.pt: bsn

    student = tmp_path / "bundle"
    shutil.copytree(path, student)
    (student / "models" / "model.pt").write_bytes(b"")
    # a trained student is not the default: the bundle's default_mode (stage 1) is
    assert load_model(student, None, "cpu", [str(overlay)]).mode == "bsn"
    common = student / "configs" / "common.yaml"
    common.write_text(common.read_text().replace("default_mode: bsn", "default_mode: student"))
    with pytest.raises(InputError, match=r"inference\.yaml: no such config file; mode 'student' reads it"):
        load_model(student, "auto", "cpu")  # default_mode student, model.pt present: the student
    # fit found no mode that beats the input: no default, and auto says so instead of running one
    common.write_text(common.read_text().replace("default_mode: student", "default_mode: null"))
    with pytest.raises(InputError, match=r"no mode of this bundle was estimated to beat the noisy input .* --mode"):
        load_model(student, "auto", "cpu", [str(overlay)])
    assert load_model(student, "bsn", "cpu", [str(overlay)]).mode == "bsn"


def test_a_volume_streams_through_the_model_in_batches_holding_one_output_volume(tmp_path):
    """Memory beyond the input is the output volume plus one batch: numpy's allocations while denoising a
    200-slice volume in batches of 4 peak near one volume (a whole-volume step would add another)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "mri.nii"
    nib.save(nib.Nifti1Image(rng.uniform(0, 1000, (64, 64, 200)).astype(np.float32), np.eye(4)), path)
    volume = read_volumes(path)[0]
    batches = []

    def model(x01):
        batches.append(x01.shape)
        return x01 * 0.5

    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    out, stats = denoise_volume(volume, model, modality="mri", batch_size=4)
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    assert batches == [(4, 64, 64)] * 50
    assert peak < 1.3 * volume.array.nbytes, peak / volume.array.nbytes
    assert out.shape == volume.array.shape and stats["noise_sigma_after"] < stats["noise_sigma_before"]


def _torchrun_denoise(src, out, bundle) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m diffdenoise.cli denoise ...` with this interpreter, on gloo."""
    path, overlay = bundle
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diffdenoise.cli",
           "denoise", str(src), str(out), "--bundle", str(path), "--config", str(overlay), "--device", "cpu"]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_torchrun_shards_the_inputs_and_writes_what_one_process_writes(shared_data, bundle, tmp_path):
    """Two ranks take two volumes each; the output is the single-process output, and the two multi-frame
    files of one phantom series, written by different ranks, still form one derived series."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("0189.dcm", "0252.dcm"):
        shutil.copy(shared_data / "phantom_mri_epi_repeats" / "series" / name, src)
    for png in sorted((shared_data / "chest_xray_mhh" / "png").glob("*.png"))[:2]:
        shutil.copy(png, src)
    before = digest(src)
    _denoise(src, tmp_path / "one", bundle)
    done = _torchrun_denoise(src, tmp_path / "two", bundle)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert digest(src) == before
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names and len(names) == 8
    reports = [json.loads((tmp_path / "two" / n).read_text()) for n in names if n.endswith(".json")]
    assert sorted(r["rank"] for r in reports) == [0, 0, 1, 1] and {r["world_size"] for r in reports} == {2}
    for name in names:
        if name.endswith(".dcm"):
            one, two = (pydicom.dcmread(tmp_path / run / name) for run in ("one", "two"))
            np.testing.assert_array_equal(one.pixel_array, two.pixel_array)
        elif name.endswith(".png"):
            np.testing.assert_array_equal(*(np.asarray(Image.open(tmp_path / run / name)) for run in ("one", "two")))
    series = {pydicom.dcmread(tmp_path / "two" / n, stop_before_pixels=True).SeriesInstanceUID for n in names
              if n.endswith(".dcm")}
    assert len(series) == 1 and series != {pydicom.dcmread(tmp_path / "one" / "0189.dcm").SeriesInstanceUID}


def test_torchrun_writes_nothing_when_one_rank_fails(shared_data, bundle, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for png in sorted((shared_data / "chest_xray_mhh" / "png").glob("*.png"))[:3]:
        shutil.copy(png, src)
    shutil.copy(get_testdata_file("MR_truncated.dcm"), src / "zz_truncated.dcm")  # the 4th volume: rank 1's
    done = _torchrun_denoise(src, tmp_path / "out", bundle)
    log = done.stdout + done.stderr
    assert done.returncode != 0 and "zz_truncated.dcm" in log and "another process of the torchrun launch" in log
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_bf16_autocast_and_compile_denoise_like_float32(noisy_series, bundle):
    path, overlay = bundle
    (volume,) = read_volumes(noisy_series[0])
    slices = normalise(volume.array, "mri")[:2]
    model = load_model(path, "bsn", "cpu", [str(overlay)])
    assert model.precision == "float32"  # auto on a CPU
    reference = model(slices)
    bf16 = load_model(path, "bsn", "cpu", [str(overlay)], precision="bfloat16")(slices)
    difference = np.abs(bf16 - reference)
    assert 0 < difference.max() < 0.05 and difference.mean() < 2e-3, (difference.max(), difference.mean())
    compiled = load_model(path, "bsn", "cpu", [str(overlay)], compile=True)
    assert isinstance(compiled.network, torch._dynamo.eval_frame.OptimizedModule)
    np.testing.assert_allclose(compiled(slices), reference, atol=1e-4)
