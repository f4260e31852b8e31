"""Stage 1 as a user runs it: the README's bundle command trains the BSN, infer_bsn writes x_c, x_c beats the input."""

import json

import numpy as np
import pytest
import torch

from diffdenoise.data import load_datalist
from diffdenoise.metrics import score_datalist
from diffdenoise.networks import BlindSpotNet
from diffdenoise.stages import run_stage, stage_config_files


def test_training_reports_self_supervised_loss_and_monitoring_psnr(trained):
    _, bundle_root, log = trained
    assert (bundle_root / "models" / "bsn.pt").is_file()
    assert "val_blind_spot_mse" in log and "val_psnr" in log
    assert list((bundle_root / "logs").glob("events.out.tfevents.*")), "TensorBoard logs missing"


def test_x_c_beats_the_noisy_input_on_the_test_split(trained):
    data, bundle_root, _ = trained
    run_stage("infer_bsn", ["presets/smoke"], dataset_dir=str(data), bundle_root=str(bundle_root))
    datalist = data / "datalist_bsn.json"
    for split in ("training", "validation", "test"):
        items = load_datalist(datalist, split)
        assert items and all(np.load(i["bsn"]).shape == np.load(i["image"]).shape for i in items)
    scores = score_datalist(datalist, ["image", "bsn"])
    noisy, bsn = scores["image"]["psnr"].mean(), scores["bsn"]["psnr"].mean()
    assert bsn > noisy + 1.0, f"BSN {bsn:.2f} dB vs noisy {noisy:.2f} dB"
    assert (scores["bsn"]["psnr"] > scores["image"]["psnr"]).all()


def test_training_works_without_clean_slices(trained, tmp_path):
    """A datalist with no clean key (real noise, the use case) trains and validates on the blind-spot loss alone."""
    data, _, _ = trained
    listing = json.loads((data / "datalist.json").read_text())
    for split in ("training", "validation", "test"):
        for item in listing[split]:
            item.pop("clean")
    noisy_only = tmp_path / "data"
    noisy_only.mkdir()
    (noisy_only / "slices").symlink_to(data / "slices")
    (noisy_only / "datalist.json").write_text(json.dumps(listing))
    run_stage("train_bsn", ["presets/smoke"], dataset_dir=str(noisy_only), bundle_root=str(tmp_path / "bundle"),
              epoch_length=5, max_epochs=1)
    assert (tmp_path / "bundle" / "models" / "bsn.pt").is_file()


def test_learned_prior_overlay_trains_on_the_likelihood_and_denoises_by_its_posterior(trained, tmp_path):
    """stage1/learned_prior: train_bsn fits mu, v and the noise level (noise_level null); infer_bsn writes both keys."""
    data, _, _ = trained
    copy = tmp_path / "data"
    copy.mkdir()
    (copy / "slices").symlink_to(data / "slices")
    (copy / "datalist.json").write_text((data / "datalist.json").read_text())
    overlays = ["presets/smoke", "stage1/learned_prior"]
    bundle_root = tmp_path / "bundle"
    run_stage("train_bsn", overlays, dataset_dir=str(copy), bundle_root=str(bundle_root), epoch_length=5, max_epochs=1)
    weights = torch.load(bundle_root / "models" / "bsn.pt", weights_only=True)
    assert weights["tail.6.weight"].shape[0] == 2, "the variance head is missing"
    start = float(BlindSpotNet(features=2, num_blocks=0, prior_variance=True).noise_log_scale)
    assert float(weights["noise_log_scale"]) != pytest.approx(start), "the noise level was not trained"
    run_stage("infer_bsn", overlays, dataset_dir=str(copy), bundle_root=str(bundle_root))
    for key in ("bsn", "bsn_posterior"):
        items = load_datalist(copy / f"datalist_{key}.json", "test")
        assert items and all(np.isfinite(np.load(i[key])).all() for i in items)


def test_unknown_stage_and_overlay_name_the_choices():
    with pytest.raises(ValueError, match="available: .*train_bsn"):
        stage_config_files("train_bs")
    with pytest.raises(ValueError, match="presets/cpu"):
        stage_config_files("train_bsn", ["presets/cpuu"])
