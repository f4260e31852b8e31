"""Every unusable input to ``diffdenoise denoise`` ends in one line on stderr naming the path and the problem,
exit status 2, no output, and an untouched input."""

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders import JPEG2000LosslessDecoder

from diffdenoise.cli import main
from diffdenoise.networks import BlindSpotNet
from test_denoise import digest, write_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """An untrained bundle: these tests check what happens around the model, not how well it denoises."""
    return write_bundle(tmp_path_factory.mktemp("untrained") / "bundle", BlindSpotNet(features=16, num_blocks=2))


def _png(path: Path, pixels) -> Path:
    Image.fromarray(np.asarray(pixels)).save(path)
    return path


def _nifti(path: Path, data) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4)), path)
    return path


def _folder(path: Path, files: dict) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _noisy_png(tmp):
    return _png(tmp / "a.png", NOISY)


def _output_inside_input(tmp):
    src = _folder(tmp / "scans", {})
    _png(src / "a.png", NOISY)
    return src, src / "denoised"


def _existing_output(tmp):
    _folder(tmp / "out", {"earlier.txt": "results of an earlier run"})
    return _noisy_png(tmp), tmp / "out"


def _bundle_without_models(tmp, bundle):
    copy = tmp / "bundle"
    (copy / "models").mkdir(parents=True)
    (copy / "configs").symlink_to(bundle / "configs")
    return copy


NOISY = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
SR, TRUNCATED = Path(get_testdata_file("reportsi.dcm")), Path(get_testdata_file("MR_truncated.dcm"))

# id -> (make(tmp, bundle) -> (input, output[, CLI options replacing the defaults]), problem after "PATH: ")
CASES = {
    "missing-path": (lambda tmp, b: (tmp / "nope", tmp / "out"), r"no such file or folder"),
    "empty-folder": (lambda tmp, b: (_folder(tmp / "empty", {}), tmp / "out"), r"no images found"),
    "non-images-only": (
        lambda tmp, b: (_folder(tmp / "docs", {"README.md": "text", "labels.csv": "a,b"}), tmp / "out"),
        r"no images found \(searched recursively for DICOM, NIfTI, PNG, TIFF\)",
    ),
    "dicom-sr": (lambda tmp, b: (SR, tmp / "out"), r"DICOM SR object without pixel data"),
    "truncated": (lambda tmp, b: (TRUNCATED, tmp / "out"), r"cannot decode the pixel data"),
    "rgb": (lambda tmp, b: (_png(tmp / "rgb.png", np.zeros((32, 32, 3), np.uint8)), tmp / "out"), r"RGB image"),
    "4d": (lambda tmp, b: (_nifti(tmp / "fmri.nii.gz", np.zeros((32, 32, 3, 2))), tmp / "out"), r"4D data"),
    "inf": (lambda tmp, b: (_nifti(tmp / "inf.nii", np.full((32, 32, 2), np.inf)), tmp / "out"), r"2048 NaN/Inf"),
    "constant": (
        lambda tmp, b: (_png(tmp / "flat.png", np.full((32, 32), 7, np.uint8)), tmp / "out"),
        r"constant image \(every pixel is 7\); there is no noise to remove",
    ),
    "4x4": (
        lambda tmp, b: (_png(tmp / "tiny.png", NOISY[:4, :4]), tmp / "out"),
        r"4x4 pixels is too small; slices need at least 16x16 pixels",
    ),
    "1-bit": (lambda tmp, b: (_png(tmp / "mask.png", NOISY > 128), tmp / "out"), r"1-bit"),
    "existing-output": (lambda tmp, b: _existing_output(tmp), r"output already exists; replace it with --overwrite"),
    "output-inside-input": (lambda tmp, b: _output_inside_input(tmp), r"output is inside the input folder"),
    "output-named-like-a-file": (lambda tmp, b: (_noisy_png(tmp), tmp / "a_denoised.png"), r"the output is a folder"),
    "missing-bundle": (
        lambda tmp, b: (_noisy_png(tmp), tmp / "out", {"--bundle": tmp / "nobundle"}),
        r"not a bundle: no configs/common\.yaml",
    ),
    "missing-model": (
        lambda tmp, b: (_noisy_png(tmp), tmp / "out", {"--bundle": _bundle_without_models(tmp, b)}),
        r"mode 'bsn' needs models/bsn\.pt \(train stage 1 first\)",
    ),
    "missing-student": (
        lambda tmp, b: (_noisy_png(tmp), tmp / "out", {"--mode": "student"}),
        r"mode 'student' needs models/model\.pt \(train stage 4 first\)",
    ),
    "unknown-mode": (
        lambda tmp, b: (_noisy_png(tmp), tmp / "out", {"--mode": "bm3d"}),
        r"--mode: 'bm3d' is not one of auto, bsn, student, srds",
    ),
    "unknown-precision": (
        lambda tmp, b: (_noisy_png(tmp), tmp / "out", {"--precision": "fp8"}),
        r"--precision: 'fp8' is not one of auto, float32, bfloat16",
    ),
    "missing-overlay": (
        lambda tmp, b: (_noisy_png(tmp), tmp / "out", {"--config": "presets/tiny"}),
        r"presets/tiny: no such config file, and overlay 'presets/tiny' not found",
    ),
}


def _run(bundle, src, out, capsys, **options):
    """``diffdenoise denoise SRC OUT`` with the test bundle, ``options`` replacing its --bundle/--config/--device."""
    path, overlay = bundle
    options = {"--bundle": path, "--config": overlay, "--device": "cpu", **options}
    code = main(["denoise", str(src), str(out), *[str(v) for pair in options.items() for v in pair]])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("make, problem", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_no_output_untouched_input(bundle, tmp_path, capsys, make, problem):
    src, out, *options = make(tmp_path, bundle[0])
    options = options[0] if options else {}
    before_in, before_out = digest(src) if src.exists() else {}, digest(out) if out.exists() else None
    code, err = _run(bundle, src, out, capsys, **options)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("diffdenoise: error: "), err
    assert re.search(problem, err), err
    at_fault = [str(p) for p in (src, out, bundle[0], *options.values())] + ["--mode", "--precision"]
    assert any(err.startswith(f"diffdenoise: error: {p}: ") for p in at_fault), err  # names the path at fault
    assert (digest(src) if src.exists() else {}) == before_in
    assert (digest(out) if out.exists() else None) == before_out
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_missing_decoder_names_the_file_and_what_to_install(shared_data, bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(JPEG2000LosslessDecoder, "_available", {})  # as if pylibjpeg-openjpeg were absent
    src = shared_data / "dicom_single_files" / "RG3_J2KR.dcm"
    before = digest(src)
    code, err = _run(bundle, src, tmp_path / "out", capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.match(rf"diffdenoise: error: {re.escape(str(src))}: cannot decode .*pip install pylibjpeg", err), err
    assert digest(src) == before and not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_a_bad_file_among_good_ones_fails_the_whole_batch(bundle, tmp_path, capsys):
    """All or nothing: outputs of the good volumes are not left behind when a later one is unusable."""
    src = tmp_path / "in"
    src.mkdir()
    _png(src / "a.png", NOISY)
    _png(src / "b_flat.png", np.full((32, 32), 3, np.uint8))
    code, err = _run(bundle, src, tmp_path / "out", capsys)
    assert code == 2
    assert err.strip().endswith("b_flat.png: constant image (every pixel is 3); there is no noise to remove")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_dicom_without_pixels_inside_a_series_folder_is_skipped(bundle, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("reportsi.dcm", "MR_small.dcm"):
        (src / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    code, _ = _run(bundle, src, tmp_path / "out", capsys)
    assert code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["MR_small.dcm", "MR_small.json"]
    assert pydicom.dcmread(tmp_path / "out" / "MR_small.dcm").ImageType[0] == "DERIVED"
