"""The stage-1 bundle trained once per test session from the command line, shared by the stage tests."""

import subprocess
import sys
from pathlib import Path

import pytest

from diffdenoise.data import prepare

REPO_ROOT = Path(__file__).resolve().parents[2]

STUDYFORREST = "brain_mri_t1_axial_studyforrest/series"


@pytest.fixture(scope="session")
def trained(shared_data, tmp_path_factory):
    """Studyforrest slices with Gaussian 15/255 noise, a BSN trained with the smoke preset from the command line."""
    root = tmp_path_factory.mktemp("bsn_stage")
    data = root / "data"
    prepare(shared_data / STUDYFORREST, data, noise="gaussian", level=15 / 255, modality="mri", seed=0, progress=False)
    bundle_root = root / "bundle"
    files = "['bundles/diffdenoise/configs/common.yaml','bundles/diffdenoise/configs/train_bsn.yaml','configs/presets/smoke.yaml']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files,
           "--dataset_dir", str(data), "--bundle_root", str(bundle_root)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return data, bundle_root, done.stderr + done.stdout
