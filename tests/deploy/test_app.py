"""The MONAI Deploy app (diffdenoise.deploy): run as the SDK documents, on the studyforrest series.

Skipped without the SDK (``pip install -e '.[deploy]'``); CI runs them in an environment of their own with
it (``scripts/test_deploy.sh``, which sets ``DIFFDENOISE_REQUIRE_DEPLOY=1``: a broken install fails there).
The slow tests train a smoke BSN once per module and export it with ``ckpt_export`` as the app's
``model.ts``; the others use element-wise TorchScript models, which make every pixel's expected value known.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser

try:
    from monai.deploy.core import Fragment
    from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator, DICOMSeriesToVolumeOperator
except ImportError as exc:  # the deploy extra is optional, except where DIFFDENOISE_REQUIRE_DEPLOY is set (CI)
    if os.environ.get("DIFFDENOISE_REQUIRE_DEPLOY"):
        raise
    pytest.skip(f"MONAI Deploy App SDK not importable ({exc}); pip install -e '.[deploy]'", allow_module_level=True)

from skimage.restoration import estimate_sigma

from diffdenoise.data import prepare
from diffdenoise.denoise import MODES, denoise_volume
from diffdenoise.deploy.app import DEFAULT_RULES, main
from diffdenoise.deploy.dicom import check_invertible, write_series
from diffdenoise.deploy.model import load_denoiser
from diffdenoise.deploy.operators import REPORT_KEY, DenoiseOperator, DICOMSeriesWriterOperator
from diffdenoise.errors import InputError
from diffdenoise.io import partial_path, read_volumes, write_volume

REPO_ROOT = Path(__file__).resolve().parents[2]
STUDYFORREST = "brain_mri_t1_axial_studyforrest/series"
KEPT = ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "StudyID", "AccessionNumber",
        "FrameOfReferenceUID", "Modality", "BitsAllocated", "BitsStored", "PixelRepresentation", "Rows",
        "Columns")  # fmt: skip
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness")


class _Square(torch.nn.Module):
    """Not symmetric under x -> 1 - x, so a wrong MONOCHROME1 polarity shows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class _Affine(torch.nn.Module):
    """Moves every value off the integer grid: the writer must round, not truncate or collapse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.8 * x + 0.1


class _Crop(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 1:, :]


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_models")
    paths = {}
    for name, module in (("square", _Square()), ("affine", _Affine()), ("crop", _Crop())):
        paths[name] = root / f"{name}.ts"
        torch.jit.script(module).save(str(paths[name]))
    return paths


@pytest.fixture(scope="module")
def smoke_model(shared_data, tmp_path_factory):
    """A BSN trained with the smoke preset (Gaussian 15/255 on studyforrest), and its ckpt_export model.ts.

    model.ts goes to its own folder, so the bundle folder has only bsn.pt (the app's bundle fallback).
    """
    root = tmp_path_factory.mktemp("deploy_bundle")
    data, bundle_root, export = root / "data", root / "bundle", root / "export"
    prepare(shared_data / STUDYFORREST, data, noise="gaussian", level=15 / 255, modality="mri", seed=0, progress=False)
    export.mkdir()
    configs = ["bundles/diffdenoise/configs/common.yaml", "configs/presets/smoke.yaml"]
    train = configs[:1] + ["bundles/diffdenoise/configs/train_bsn.yaml"] + configs[1:]
    commands = [
        ["run", "--config_file", str(train), "--dataset_dir", str(data), "--bundle_root", str(bundle_root)],
        ["ckpt_export", "bsn_def", "--filepath", str(export / "model.ts"), "--ckpt_file",
         str(bundle_root / "models" / "bsn.pt"), "--key_in_ckpt", "", "--config_file", str(configs),
         "--meta_file", "bundles/diffdenoise/configs/metadata.json"],
    ]  # fmt: skip
    for args in commands:
        done = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=1200)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(REPO_ROOT / "bundles" / "diffdenoise" / "configs", bundle_root / "configs")  # a bundle folder
    return bundle_root, export / "model.ts"


def _files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}


def _sdk_pipeline(src: Path, model: Path, out: Path, **options):
    """The app's operators called in-process, without the scheduler: float image and written series."""
    fragment = Fragment()
    studies = DICOMDataLoaderOperator(fragment, name="loader").load_data_to_studies(src)
    selector = DICOMSeriesSelectorOperator(fragment, name="selector")
    selected = selector.filter(json.loads(DEFAULT_RULES), studies, all_matched=True, sort_by_sop_instance_count=True)
    image = DICOMSeriesToVolumeOperator(fragment, name="to_volume").convert_to_image(selected)
    denoise_op = DenoiseOperator(fragment, model_path=model, device="cpu", name="denoise", **options)
    denoised = denoise_op.denoise(image, selected)
    written = DICOMSeriesWriterOperator(fragment, output_folder=out, name="writer").write(denoised, selected)
    datasets = [sop.get_native_sop_instance() for sop in selected[0].selected_series[0].series.get_sop_instances()]
    return denoised, written, datasets


def _check_derived_series(src_files: dict[str, Path], out_files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """Output is a new series of the same slices, geometry and identifiers; returns (input, output) volumes."""
    assert sorted(out_files) == sorted(src_files)
    pairs = [(pydicom.dcmread(src_files[name]), pydicom.dcmread(out_files[name])) for name in sorted(src_files)]
    series_uids = {str(out.SeriesInstanceUID) for _, out in pairs}
    assert len(series_uids) == 1 and series_uids.isdisjoint({str(src.SeriesInstanceUID) for src, _ in pairs})
    sop_uids = [str(out.SOPInstanceUID) for _, out in pairs]
    assert len(set(sop_uids)) == len(pairs) and set(sop_uids).isdisjoint(str(src.SOPInstanceUID) for src, _ in pairs)
    for src, out in pairs:
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.ImageType[0] == "DERIVED" and "DerivationDescription" in out
        for keyword in (*GEOMETRY, *KEPT, "RescaleSlope", "RescaleIntercept", "InstanceNumber"):
            assert out.get(keyword) == src.get(keyword), keyword
    return (np.stack([src.pixel_array for src, _ in pairs]).astype(np.float64),
            np.stack([out.pixel_array for _, out in pairs]).astype(np.float64))  # fmt: skip


def _run_cli(args, timeout=900):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "diffdenoise.deploy.app", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "DIFFDENOISE_DEVICE": "cpu"})  # fmt: skip
    return done, time.perf_counter() - started


@pytest.mark.slow
def test_command_line_app_denoises_studyforrest_with_the_smoke_bsn(shared_data, smoke_model, tmp_path):
    """``python -m diffdenoise.deploy.app -i -o -m model.ts``: a derived series, float kept, noise down."""
    src = shared_data / STUDYFORREST
    done, wall = _run_cli(["-i", str(src), "-o", str(tmp_path / "out"), "-m", str(smoke_model[1])])
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"\nDeploy app on {len(list(src.iterdir()))} slices, smoke BSN, CPU: {wall:.1f} s wall")
    (report_file,) = (tmp_path / "out").glob("*.json")
    report = json.loads(report_file.read_text())
    out_dir = Path(report["output"])
    assert out_dir.is_dir() and out_dir.parent.resolve() == (tmp_path / "out").resolve()
    before, after = _check_derived_series(_files(src), _files(out_dir))
    assert report["slices"] == len(before) == 64
    # Not a uint8 collapse: the output follows the input's full range and most of its levels.
    assert len(np.unique(after)) >= 0.5 * len(np.unique(before)) and len(np.unique(after)) > 64
    assert np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.95
    assert abs(after.max() - before.max()) <= 0.05 * before.max()
    # The noise estimate of the written pixels, normalised as the model saw them, does not rise.
    low, high = report["intensity_range"]
    sigma = [np.mean([estimate_sigma(np.clip((s - low) / (high - low), 0, 1)) for s in v]) for v in (before, after)]
    assert sigma[1] <= sigma[0], sigma
    assert report["noise_sigma_after"] <= report["noise_sigma_before"]
    assert report["model_sha256"]
    assert report["SeriesInstanceUID"] == str(pydicom.dcmread(next(out_dir.iterdir())).SeriesInstanceUID)


@pytest.mark.slow
def test_bundle_folder_and_model_ts_through_its_embedded_inferer_agree(shared_data, smoke_model):
    """The app's two model sources: bsn.pt built by load_model, and model.ts run by the embedded configs' inferer."""
    bundle_root, model_ts = smoke_model
    from_bundle = load_denoiser(bundle_root, device="cpu", mode="bsn", config=["presets/smoke"])
    from_ts = load_denoiser(model_ts, device="cpu", inferer_key=MODES["bsn"].inferer_key)
    assert from_bundle.path.name == "bsn.pt" and from_ts.path.name == "model.ts"
    assert from_ts.inferer_name.startswith(f"embedded `{MODES['bsn'].inferer_key}`")
    volume = read_volumes(shared_data / STUDYFORREST)[0]
    x = np.clip(volume.array[30:32] / np.percentile(volume.array, 99.9), 0, 1)
    np.testing.assert_allclose(from_ts(x), from_bundle(x), atol=1e-5)


def test_student_model_ts_runs_through_its_embedded_inferer(tmp_path):
    """The bundle's deploy artifact: inference.yaml's network_def exported by ckpt_export (untrained weights)."""
    configs = REPO_ROOT / "bundles" / "diffdenoise" / "configs"
    if not (configs / "inference.yaml").is_file():
        pytest.skip("bundles/diffdenoise/configs/inference.yaml (the student) does not exist yet")
    files = [str(configs / name) for name in ("common.yaml", "inference.yaml")]
    files.append(str(REPO_ROOT / "configs" / "presets" / "smoke.yaml"))
    parser = ConfigParser()
    parser.read_config(files)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    args = ["ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts"),
            "--ckpt_file", str(tmp_path / "model.pt"), "--meta_file", str(configs / "metadata.json"),
            "--config_file", str(files)]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    student = load_denoiser(tmp_path, device="cpu")
    assert student.path.name == "model.ts" and student.inferer_name.startswith("embedded `inferer`")
    x = np.random.default_rng(0).random((2, 75, 61), dtype=np.float32)  # odd sizes: the network pads itself
    y = student(x)
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()


@pytest.mark.parametrize("series", [STUDYFORREST, "head_ct_ge/series", "dicom_single_files/RG3_J2KR.dcm"],
                         ids=["mr", "ct_tilted", "cr_monochrome1_jpeg2000"])  # fmt: skip
def test_operators_write_what_diffdenoise_denoise_writes(shared_data, toy_models, tmp_path, series):
    """SDK read + our operators == diffdenoise.io read + denoise_volume + write_volume, stored value for value.

    ``x * x`` shows slice order, rescale, window and MONOCHROME1 polarity errors (the io reader mirrors
    MONOCHROME1; the SDK does not, so DenoiseOperator negates it).
    """
    src = shared_data / series
    if src.is_file():  # the SDK loader reads folders
        (tmp_path / "in").mkdir()
        src = Path(shutil.copy(src, tmp_path / "in"))
    folder = src if src.is_dir() else src.parent
    _, written, _ = _sdk_pipeline(folder, toy_models["square"], tmp_path / "deploy")
    model = load_denoiser(toy_models["square"], device="cpu")
    (volume,) = read_volumes(src)
    (tmp_path / "reference").mkdir()
    reference = write_volume(volume, denoise_volume(volume, model)[0], tmp_path / "reference" / volume.volume_id, "x")
    assert written.name == reference.name
    pairs = [(written, reference)] if written.is_file() else [(written / n, reference / n) for n in _files(reference)]
    assert len(pairs) == len(volume.array)
    for ours, theirs in pairs:
        a, b = pydicom.dcmread(ours), pydicom.dcmread(theirs)
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array, err_msg=ours.name)
        assert a.PhotometricInterpretation == b.PhotometricInterpretation


def test_float_image_round_trips_within_the_stored_bit_depth(shared_data, toy_models, tmp_path):
    """Off-grid float values are rounded to the nearest stored value, not truncated to uint8."""
    src = shared_data / STUDYFORREST
    denoised, written, datasets = _sdk_pipeline(src, toy_models["affine"], tmp_path / "out")
    values = denoised.asnumpy()
    assert values.dtype == np.float32 and values.shape == (64, 384, 274)
    assert np.mean(np.abs(values - np.round(values)) > 0.1) > 0.5, "the test needs off-grid values"
    report = denoised.metadata()[REPORT_KEY]
    assert report["inferer"] == "direct call" and report["model_file"].endswith("affine.ts")
    for k, ds in enumerate(datasets):
        out = pydicom.dcmread(written / Path(ds.filename).name)
        slope, intercept = float(out.get("RescaleSlope", 1)), float(out.get("RescaleIntercept", 0))
        physical = out.pixel_array * slope + intercept
        assert np.abs(physical - values[k]).max() <= 0.5 * slope + 1e-3, ds.filename
    assert (tmp_path / "out" / f"{written.name}.json").is_file()


def test_bad_models_are_refused_in_one_line(shared_data, toy_models, tmp_path):
    not_a_model = tmp_path / "model.ts"
    not_a_model.write_text("weights")
    with pytest.raises(InputError, match="not a TorchScript model"):
        load_denoiser(not_a_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no model.ts, models/model.ts"):
        load_denoiser(tmp_path / "empty")
    with pytest.raises(InputError, match=r"maps input \(2, 1, 32, 32\) to \(2, 1, 31, 32\)"):
        load_denoiser(toy_models["crop"], device="cpu")(np.zeros((2, 32, 32), np.float32))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="torch sees no CUDA device"):
            load_denoiser(toy_models["affine"], device="cuda")
    argv = ["app", "-i", str(shared_data / STUDYFORREST), "-o", str(tmp_path / "out"), "-m", str(not_a_model)]
    assert main(argv) == 2
    assert not any((tmp_path / "out").iterdir())


def test_lookup_tables_that_cannot_be_inverted_are_refused(shared_data):
    ds = pydicom.dcmread(next((shared_data / STUDYFORREST).iterdir()), stop_before_pixels=True)
    check_invertible(ds)
    ds.PresentationLUTShape = "INVERSE"
    with pytest.raises(InputError, match="INVERSE"):
        check_invertible(ds)


def test_series_writer_replaces_its_output_and_removes_what_a_killed_run_left(shared_data, tmp_path):
    """A rerun into the same folder: the old series is replaced whole, a dead run's staging folder is removed."""
    datasets = [pydicom.dcmread(f) for f in sorted((shared_data / STUDYFORREST).iterdir())[:3]]
    array = np.stack([ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
                      for ds in datasets]).astype(np.float32)  # fmt: skip
    out = tmp_path / "out"
    first = write_series(datasets, array, out, "first run", report={})
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()  # a process id that no longer runs, as after kill -9
    _, volume_id, host, *_ = partial_path(first).name.split(".")
    dead = out / f".{volume_id}.{host}.{killed.pid}.0000abcd.partial"
    dead.mkdir()
    (dead / "half.dcm").write_bytes(b"half written")
    second = write_series(datasets, array, out, "second run", report={})
    assert second == first and not dead.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([volume_id, f"{volume_id}.json"])
    assert {pydicom.dcmread(f).DerivationDescription for f in second.iterdir()} == {"second run"}
    assert len(list(second.iterdir())) == 3
