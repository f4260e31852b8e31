"""`diffdenoise fit` on real noisy scans (no clean image anywhere): a finished bundle that MONAI and `denoise` run."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pydicom
import torch

from diffdenoise.cli import main

STAGE_CONFIGS = {"common", "train_bsn", "infer_bsn", "train_diffusion", "sample_srds", "train_student", "inference"}


def test_fit_leaves_a_bundle_that_monai_bundle_run_and_denoise_use(shared_data, tmp_path):
    src = shared_data / "phantom_mri_epi_repeats/series/0126.dcm"  # one EPI repeat: 63 frames, real noise
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    run_dir = tmp_path / "my_bundle"
    assert main(["fit", str(src), str(run_dir), "--preset", "smoke"]) == 0
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert {p.stem for p in (run_dir / "configs").glob("*.yaml")} == STAGE_CONFIGS
    assert (run_dir / "configs" / "metadata.json").is_file() and (run_dir / "LICENSE").is_file()
    for name in ("bsn.pt", "diffusion.pt", "model.pt", "model.ts"):
        assert (run_dir / "models" / name).stat().st_size > 0, name
    datalist = json.loads((run_dir / "data" / "datalist_student.json").read_text())
    assert "clean" not in datalist["training"][0] and "srds" in datalist["training"][0]
    assert not list(tmp_path.glob(".my_bundle*"))  # no partial folder left beside it

    # the merged config alone runs the student, from any working directory
    (run_dir / "data" / "datalist_student.json").unlink()
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(run_dir / "configs" / "inference.yaml")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    item = json.loads((run_dir / "data" / "datalist_student.json").read_text())["test"][0]
    student_out = np.load(run_dir / "data" / item["student"])

    # the exported TorchScript student gives the same output as the checkpoint
    noisy = torch.from_numpy(np.load(run_dir / "data" / item["image"]))[None, None]
    scripted = torch.jit.load(str(run_dir / "models" / "model.ts"))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(noisy)[0, 0].numpy(), student_out, atol=1e-5)

    # and `diffdenoise denoise` uses the bundle (the student, found by default) on a scan
    out = tmp_path / "denoised"
    assert main(["denoise", str(src), str(out), "--bundle", str(run_dir)]) == 0
    written = sorted(out.rglob("*.dcm"))
    assert written and pydicom.dcmread(written[0]).SeriesInstanceUID != pydicom.dcmread(src).SeriesInstanceUID
