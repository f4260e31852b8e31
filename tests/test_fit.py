"""`diffdenoise fit` on real noisy scans (no clean image anywhere): a finished bundle that MONAI and `denoise` run,
every slice but the validation split trained on, and a log that says what happens, readable line by line."""

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import onnxruntime
import pydicom
import pytest
import torch
from PIL import Image

from monai.bundle import ConfigParser

from diffdenoise.cli import main
from diffdenoise.denoise import load_model
from diffdenoise.logs import KNOWN_NOTICES
from diffdenoise.pipeline import pipeline_steps

STAGE_CONFIGS = {"common", "train_bsn", "infer_bsn", "train_diffusion", "sample_srds", "train_student", "inference"}
PHANTOM = "phantom_mri_epi_repeats/series/0126.dcm"  # one EPI repeat: 63 frames, real noise


@pytest.fixture(scope="module")
def fitted(shared_data, tmp_path_factory):
    """One fit as a user runs it with its output redirected to a file: two iterations (the second conditioned on
    the first student), ONNX too. Returns (source, its hash before, RUN_DIR, the log)."""
    src = shared_data / PHANTOM
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    tmp_path = tmp_path_factory.mktemp("fit")
    run_dir, log = tmp_path / "my_bundle", tmp_path / "fit.log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "diffdenoise.cli", "fit", str(src), str(run_dir), "--preset",
                               "smoke", "--iterations", "2", "--onnx"], stdout=out, stderr=subprocess.STDOUT,
                              timeout=1800)
    assert done.returncode == 0, log.read_text()[-3000:]
    return src, before, run_dir, log.read_text()


def test_fit_log_is_readable_and_plans_every_stage_with_an_estimate(fitted):
    _, _, run_dir, log = fitted
    assert "\r" not in log and "\x1b" not in log  # no progress bar redraws, no terminal codes in a file
    steps = pipeline_steps(run_dir / "data", 2)
    planned = re.findall(r"^\d\d:\d\d:\d\d   \[(\d+)/(\d+)\] (\S+) \(.+\): .+; about \d+ (?:s|min)", log, re.M)
    assert [name for _, _, name in planned] == [step.name for step in steps] + ["assessment"]
    assert all(int(total) == len(steps) + 1 for _, total, _ in planned)
    assert re.search(r"^\d\d:\d\d:\d\d in all about .+: done around \d\d:\d\d$", log, re.M)
    # each config run says when it starts and what is left, then shows its progress as plain lines
    for step in steps:
        start = rf"^\d\d:\d\d:\d\d \[\d+/\d+\] {re.escape(step.name)} \(.+\): about .+; left in all about .+: done around "
        assert re.search(start, log, re.M), step.name
    assert re.search(r"^\d\d:\d\d:\d\d stage 2 diffusion training: \d+ iterations in ", log, re.M)
    # the summary: a row per stage with its time, output and estimated gain
    summary = log[log.index("done in "):]
    for row in ("prepare", "timing", "stage 1: blind-spot network", "stages 2-3: diffusion, iteration 2",
                "stage 4: distilled student, iteration 2", "assessment", "export"):
        assert re.search(rf"^\d\d:\d\d:\d\d   {re.escape(row)} +\d+ (?:s|min)", summary, re.M), row
    assert re.search(r"^.*stage 1: blind-spot network .* data/bsn/, data/bsn_posterior/ +[+-]\d+\.\d\d dB", summary,
                     re.M)
    # MONAI's repeated notices are gone, and so are its per-epoch lines at the default verbosity
    assert not any(text in log for _, text in KNOWN_NOTICES) and "input summary" not in log and "Epoch[" not in log


def test_fit_trains_on_every_slice_but_the_validation_split(fitted):
    _, _, run_dir, log = fitted
    datalist = json.loads((run_dir / "data" / "datalist.json").read_text())
    (volume,) = datalist["meta"]["volumes"].values()
    foreground = volume["slices_written"] + len(volume["guard_slices"])
    assert datalist["test"] == [] and len(volume["guard_slices"]) == 1
    assert len(datalist["training"]) + len(datalist["validation"]) == foreground - 1
    assert len(datalist["validation"]) < len(datalist["training"]) / 4
    counts = (f"1 volume: {len(datalist['training'])} slices for training, {len(datalist['validation'])} for "
              "validation, no test split")
    assert counts in log


def test_fit_with_too_few_slices_for_a_validation_split_is_one_clear_error(tmp_path):
    """In its own process, as the command sets up the process's logging."""
    src = tmp_path / "scans"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(30, 220, (48, 40), dtype=np.uint8)).save(src / "a.png")
    done = subprocess.run([sys.executable, "-m", "diffdenoise.cli", "fit", str(src), str(tmp_path / "run"),
                           "--preset", "smoke"], capture_output=True, text=True, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and err[-1].startswith("diffdenoise: error: ") and "validation split" in err[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scans"]


def test_fit_leaves_a_bundle_that_monai_bundle_run_and_denoise_use(fitted, tmp_path):
    """The bundle ships the last iteration's student."""
    src, before, run_dir, log = fitted
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert {p.stem for p in (run_dir / "configs").glob("*.yaml")} == STAGE_CONFIGS
    assert (run_dir / "configs" / "metadata.json").is_file() and (run_dir / "LICENSE").is_file()
    for name in ("bsn.pt", "diffusion.pt", "model.pt", "diffusion_iter2.pt", "model_iter2.pt", "model.ts", "model.onnx"):
        assert (run_dir / "models" / name).stat().st_size > 0, name
    datalist = json.loads((run_dir / "data" / "datalist_student_iter2.json").read_text())
    assert "clean" not in datalist["training"][0]
    assert {"bsn", "srds", "student", "srds_iter2", "student_iter2"} <= set(datalist["training"][0])
    assert not list(run_dir.parent.glob(".my_bundle*"))  # no partial folder left beside it

    # every mode's estimated gain on the validation slices, printed and stored; the best positive one is the default
    report = (run_dir / "report.md").read_text()
    assert report in log
    assessment = json.loads((run_dir / "configs" / "metadata.json").read_text())["diffdenoise_assessment"]
    gains = {mode: row["estimated_gain_db"] for mode, row in assessment["modes"].items()}
    assert set(gains) == {"bsn", "srds", "student"} and all(f"`{mode}`" in report for mode in gains)
    best = max(gains, key=gains.get)
    assert assessment["default_mode"] == (best if gains[best] > 0 else None) and assessment["split"] == "validation"
    assert ConfigParser.load_config_file(run_dir / "configs" / "common.yaml")["default_mode"] == assessment["default_mode"]

    # iteration 2's diffusion model was fine-tuned from iteration 1's: far nearer to it than a fresh one is
    first, second = (torch.load(run_dir / "models" / f"diffusion{s}.pt", weights_only=True) for s in ("", "_iter2"))
    parser = ConfigParser()
    parser.read_config(str(run_dir / "configs" / "sample_srds.yaml"))
    torch.manual_seed(1)
    fresh = parser.get_parsed_content("diffusion_def").state_dict()
    moved, apart = (sum(float((second[k] - other[k]).norm()) for k in second) for other in (first, fresh))
    assert moved < 0.5 * apart

    # the bundle's SRDS is iteration 2's: its condition comes from the first student, so it reproduces the
    # stored iteration-2 pseudo-target of a slice from the noisy slice alone
    item = datalist["training"][0]
    noisy = np.load(run_dir / "data" / item["image"])
    srds = load_model(run_dir, "srds", "cpu")
    np.testing.assert_allclose(srds(noisy[None])[0], np.load(run_dir / "data" / item["srds_iter2"]), atol=1e-4)

    # the merged config alone runs the last student, from any working directory
    (run_dir / "data" / "datalist_student_iter2.json").unlink()
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(run_dir / "configs" / "inference.yaml")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    item = json.loads((run_dir / "data" / "datalist_student_iter2.json").read_text())["validation"][0]
    student_out = np.load(run_dir / "data" / item["student_iter2"])

    # the exported TorchScript student gives the same output as the checkpoint
    noisy = torch.from_numpy(np.load(run_dir / "data" / item["image"]))[None, None]
    scripted = torch.jit.load(str(run_dir / "models" / "model.ts"))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(noisy)[0, 0].numpy(), student_out, atol=1e-5)
    # and so does the ONNX one in ONNX Runtime
    session = onnxruntime.InferenceSession(str(run_dir / "models" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": noisy.numpy()})[0][0, 0], student_out, atol=1e-5)

    # and `diffdenoise denoise` runs the bundle's student on a scan, reporting its estimated gain
    out = tmp_path / "denoised"
    assert main(["denoise", str(src), str(out), "--bundle", str(run_dir), "--mode", "student"]) == 0
    written = sorted(out.rglob("*.dcm"))
    assert written and pydicom.dcmread(written[0]).SeriesInstanceUID != pydicom.dcmread(src).SeriesInstanceUID
    (volume_report,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert volume_report["mode"] == "student" and "estimated_gain_db" in volume_report["quality"]
