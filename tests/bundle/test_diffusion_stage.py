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


def test_sample_srds_writes_pseudo_targets_and_denoise_mode_srds_computes_its_own_condition(trained):
    """Stage 3 after a short stage 2, on a few slices of each split: srds/*.npy for each, finite, near the input;
    the `srds` mode of `diffdenoise denoise` builds the same sampler with x_c from the stage-1 network."""
    import json
    import shutil

    from diffdenoise.data import load_datalist
    from diffdenoise.denoise import load_model
    from diffdenoise.stages import bundle_dir, run_stage

    data, bundle_root, _ = trained
    if not (data / "datalist_bsn_posterior.json").is_file():
        run_stage("infer_bsn", ["presets/smoke"], dataset_dir=str(data), bundle_root=str(bundle_root))
    if not (bundle_root / "models" / "diffusion.pt").is_file():
        run_stage("train_diffusion", ["presets/smoke"], dataset_dir=str(data), bundle_root=str(bundle_root),
                  epoch_length=4, max_epochs=1)
    # full-size slices cost seconds per DDIM step on a CPU: two slices per split prove the wiring
    full = json.loads((data / "datalist_bsn_posterior.json").read_text())
    few = {**{split: full[split][:2] for split in ("training", "validation", "test")}, "meta": full["meta"]}
    (data / "datalist_few.json").write_text(json.dumps(few))
    run_stage("sample_srds", ["presets/smoke"], dataset_dir=str(data), bundle_root=str(bundle_root), srds_steps=2,
              srds_input_datalist_path=str(data / "datalist_few.json"))
    items = {split: load_datalist(data / "datalist_srds.json", split) for split in ("training", "validation", "test")}
    assert [len(v) for v in items.values()] == [2, 2, 2]
    for item in items["test"]:
        noisy, out = np.load(item["image"]), np.load(item["srds"])
        assert {"bsn", "bsn_posterior", "clean"} <= set(item)
        # 384 x 274: not a multiple of 4, so the sampler padded for the 3-level U-Net and cropped back
        assert out.shape == noisy.shape and np.isfinite(out).all()
        assert np.abs(out - noisy).mean() < 0.5

    shutil.copytree(bundle_dir() / "configs", bundle_root / "configs", dirs_exist_ok=True)
    model = load_model(bundle_root, mode="srds", device="cpu", config=["presets/smoke"])
    out = model(np.load(items["test"][0]["image"])[None, :64, :62])
    assert out.shape == (1, 64, 62) and np.isfinite(out).all()


def test_ema_warm_up_drops_the_initial_weights_that_a_plain_ema_keeps():
    """With EMA momentum 0.001 a short run's average keeps (1 - 0.001)^n of the random initial weights (30% after
    1200 iterations, docs/results.md); the config's optional warm-up removes them."""
    from ignite.engine import Engine

    from diffdenoise.stages import stage_parser

    def ema_after(iterations, **warm_up):
        parser = stage_parser("train_diffusion", ["presets/smoke"], network="$torch.nn.Linear(1, 1, bias=False)",
                              **warm_up)
        network, ema = parser.get_parsed_content("network"), parser.get_parsed_content("ema")
        torch.nn.init.zeros_(network.weight)
        ema.ema_model.load_state_dict(network.state_dict())

        def step(engine, batch):  # training moves the weight from 0 to 1 at once
            torch.nn.init.ones_(network.weight)

        engine = Engine(step)
        ema.attach(engine)
        engine.run(range(iterations), max_epochs=1)
        return float(ema.ema_model.weight)

    assert abs(ema_after(100) - (1 - 0.999**100)) < 1e-4  # about 0.095: mostly the initial weight
    assert ema_after(100, ema_momentum_warmup=0.5, ema_warmup_iters=50) > 0.999
