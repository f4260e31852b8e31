"""Stage 2 wiring: train_diffusion.yaml trains the conditional diffusion U-Net on noisy slices + x_c."""

import numpy as np
import torch

from diffdenoise.diffusion import ConditionalDiffusionBatch
from diffdenoise.inferers.srds import to_image


def test_batch_diffuses_the_residual_and_concatenates_the_condition():
    """The eps target and the inferer kwargs match what SRDSInferer samples back (r = (x' - x_c) / s)."""
    torch.manual_seed(0)
    noisy, cond = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    prepare = ConditionalDiffusionBatch(num_train_timesteps=1000, condition_name="bsn", residual_scale=0.05)
    images, target, args, kwargs = prepare({"image": noisy, "bsn": cond}, device="cpu")
    torch.testing.assert_close(to_image(images, cond, "residual", 0.05), noisy)
    assert kwargs["mode"] == "concat" and kwargs["condition"] is not None
    assert torch.equal(target, kwargs["noise"]) and args == ()
    assert kwargs["timesteps"].shape == (2,) and int(kwargs["timesteps"].max()) < 1000


def test_smoke_training_writes_the_ema_checkpoint(trained, tmp_path):
    """A few iterations on the x_c written by stage 1: the EMA checkpoint appears and loads."""
    from diffdenoise.stages import run_stage, stage_parser

    data, bundle_root, _ = trained
    if not (data / "datalist_bsn.json").is_file():
        run_stage("infer_bsn", ["presets/smoke"], dataset_dir=str(data), bundle_root=str(bundle_root))
    run_stage("train_diffusion", ["presets/smoke"], dataset_dir=str(data), bundle_root=str(bundle_root),
              epoch_length=4, max_epochs=1)
    ckpt = bundle_root / "models" / "diffusion.pt"
    assert ckpt.is_file()
    network = stage_parser("train_diffusion", ["presets/smoke"]).get_parsed_content("diffusion_def")
    network.load_state_dict(torch.load(ckpt, weights_only=True))
    out = network(torch.zeros(1, 2, 32, 32), timesteps=torch.tensor([10]))
    assert out.shape == (1, 1, 32, 32) and np.isfinite(out.detach().numpy()).all()
