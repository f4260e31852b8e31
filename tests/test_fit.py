"""`diffdenoise fit` on real noisy scans (no clean image anywhere): a finished bundle that MONAI and `denoise` run."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pydicom
import torch

from monai.bundle import ConfigParser

from diffdenoise.cli import main
from diffdenoise.denoise import load_model

STAGE_CONFIGS = {"common", "train_bsn", "infer_bsn", "train_diffusion", "sample_srds", "train_student", "inference"}


def test_fit_leaves_a_bundle_that_monai_bundle_run_and_denoise_use(shared_data, tmp_path, capsys):
    """Two iterations (the second conditioned on the first student); the bundle ships the last student."""
    src = shared_data / "phantom_mri_epi_repeats/series/0126.dcm"  # one EPI repeat: 63 frames, real noise
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    run_dir = tmp_path / "my_bundle"
    assert main(["fit", str(src), str(run_dir), "--preset", "smoke", "--iterations", "2", "--onnx"]) == 0
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert {p.stem for p in (run_dir / "configs").glob("*.yaml")} == STAGE_CONFIGS
    assert (run_dir / "configs" / "metadata.json").is_file() and (run_dir / "LICENSE").is_file()
    for name in ("bsn.pt", "diffusion.pt", "model.pt", "diffusion_iter2.pt", "model_iter2.pt", "model.ts", "model.onnx"):
        assert (run_dir / "models" / name).stat().st_size > 0, name
    datalist = json.loads((run_dir / "data" / "datalist_student_iter2.json").read_text())
    assert "clean" not in datalist["training"][0]
    assert {"bsn", "srds", "student", "srds_iter2", "student_iter2"} <= set(datalist["training"][0])
    assert not list(tmp_path.glob(".my_bundle*"))  # no partial folder left beside it

    # every mode's estimated gain on the validation slices, printed and stored; the best positive one is the default
    report = (run_dir / "report.md").read_text()
    assert report in capsys.readouterr().out
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
    item = json.loads((run_dir / "data" / "datalist_student_iter2.json").read_text())["test"][0]
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
