"""Stages 2-3 study for docs/results.md: does SRDS beat the BSN, and where does it overtake it as training grows?

Takes a dataset folder where stage 1 already ran (``datalist_bsn.json``, e.g. from scripts/results_bsn.py),
trains the conditional diffusion model with ``train_diffusion.yaml`` and the given preset, saving the EMA
weights every ``--snapshot_every`` iterations, then scores every snapshot on the test split against the
clean slices:

- ``bsn``: x_c, the condition (blind); ``bsn_posterior``: the stage-1 denoiser, when infer_bsn wrote it;
- ``single``: one deterministic DDIM sample from eps; ``independent``: the mean of samples from two
  independent noises; ``srds``: the mean of the eps and -eps samples (paper eq. 4); ``srds_k4``: 4 pairs;
- the leak diagnostic: correlation of the output's residual (out - x_c) with the input's noise residual
  (x' - x_c), and of the output's error (out - clean) with the true noise (x' - clean). A model that
  regenerates the input's actual noise scores near 1; a denoiser near 0;
- ``srds_shrinkage``: x_c + a (x' - x_c), with a the slope of SRDS's residual on the input's (reported as
  ``srds_slope_on_input_residual``). It is what SRDS would score if its leak were all it did. SRDS above it puts
  back detail beyond the copied share of the input; below it, it adds error.

Scoring runs on the centre ``--crop`` pixels of each test slice (the brain; full slices cost minutes per
snapshot on a CPU), with ``sample_srds.yaml``'s x0 clamp (``srds_clip_x0``; ``--srds_clip_x0 None`` turns it off). Writes OUT/curve.json and prints markdown tables.

Usage: python scripts/results_srds.py DATASET_DIR --out runs/results_srds --preset cpu [--iterations 3000]
       [--snapshot_every 500] [--crop 128] [--steps 20] [--max_seconds S] [--key value ...config overrides]
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import fire
import numpy as np
import torch
from ignite.engine import Events
from ignite.handlers import TimeLimit

from diffdenoise.data import load_datalist
from diffdenoise.inferers import SRDSInferer
from diffdenoise.metrics import input_shrinkage, noise_leak, psnr, ssim
from diffdenoise.stages import stage_parser

METHODS = ("noisy", "bsn", "bsn_posterior", "single", "independent", "srds", "srds_k4", "srds_shrinkage")


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size`` x ``size`` pixels (the whole axis when it is shorter)."""
    top, left = max((image.shape[0] - size) // 2, 0), max((image.shape[1] - size) // 2, 0)
    return image[top:top + size, left:left + size]


def train_with_snapshots(parser, out: Path, every: int, max_seconds: int | None = None) -> None:
    """Runs the stage's trainer, saving the EMA weights every ``every`` iterations; with ``max_seconds``, stops
    at the first snapshot past that wall-clock budget (a leased GPU's time is fixed, its speed not known ahead)."""
    trainer, ema = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("ema")

    def save(engine):
        torch.save(ema.ema_model.state_dict(), out / f"diffusion_{engine.state.iteration:06d}.pt")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every), save)
    if max_seconds is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every), TimeLimit(max_seconds))
    parser.get_parsed_content("initialize")
    trainer.run()


def score_snapshot(parser, snapshot: Path, items: list[dict], crop: int, steps: int, clip_x0) -> dict:
    """Every method's PSNR/SSIM per slice, the leak correlations, and seconds per slice for SRDS."""
    network = parser.get_parsed_content("diffusion_def")
    network.load_state_dict(torch.load(snapshot, map_location="cpu", weights_only=True))
    network = network.to(parser.get_parsed_content("device")).eval()
    scheduler = parser.get_parsed_content("noise_scheduler")
    common = {"scheduler": scheduler, "num_inference_steps": steps, "target": parser["diffusion_target"],
              "residual_scale": parser["residual_scale"], "seed": 0, "clip_x0": clip_x0}
    samplers = {"srds": SRDSInferer(**common), "independent": SRDSInferer(**common, symmetric=False),
                "srds_k4": SRDSInferer(**common, num_pairs=4)}
    single = SRDSInferer(**common)
    result = {m: {"psnr": [], "ssim": []} for m in METHODS}
    result["leak"] = {"srds_vs_input_residual": [], "srds_vs_true_noise": [], "single_vs_input_residual": [],
                      "single_vs_true_noise": [], "srds_slope_on_input_residual": []}
    seconds = []
    device = next(network.parameters()).device
    for item in items:
        arrays = {k: centre_crop(np.load(item[k]), crop) for k in ("image", "clean", "bsn")}
        if "bsn_posterior" in item:
            arrays["bsn_posterior"] = centre_crop(np.load(item["bsn_posterior"]), crop)
        x, c = (torch.from_numpy(np.ascontiguousarray(arrays[k]))[None, None].to(device) for k in ("image", "bsn"))
        outputs = {"noisy": arrays["image"], "bsn": arrays["bsn"], "bsn_posterior": arrays.get("bsn_posterior")}
        with torch.inference_mode():
            eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
            outputs["single"] = single.sample(x, network, c, eps)[0, 0].cpu().numpy()
            for name, sampler in samplers.items():
                t0 = time.perf_counter()
                outputs[name] = sampler(x, network, condition=c)[0, 0].cpu().numpy()
                if name == "srds":
                    seconds.append(time.perf_counter() - t0)
        clean, noisy, x_c = arrays["clean"], arrays["image"], arrays["bsn"]
        slope, outputs["srds_shrinkage"] = input_shrinkage(outputs["srds"], noisy, x_c)
        result["leak"]["srds_slope_on_input_residual"].append(slope)
        for name, out in outputs.items():
            if out is not None:
                result[name]["psnr"].append(psnr(out, clean))
                result[name]["ssim"].append(ssim(out, clean))
        for name in ("srds", "single"):
            result["leak"][f"{name}_vs_input_residual"].append(noise_leak(outputs[name], noisy, x_c))
            result["leak"][f"{name}_vs_true_noise"].append(noise_leak(outputs[name], noisy, clean))
    result = {k: v for k, v in result.items() if k == "leak" or v["psnr"]}
    result["srds_seconds_per_slice"] = float(np.mean(seconds))
    return result


def main(dataset: str, out: str = "runs/results_srds", preset: str = "cpu", iterations: int = 3000,
         snapshot_every: int = 500, crop: int = 128, steps: int = 20, score_only: bool = False,
         max_seconds: int | None = None, **overrides):
    """Train (unless ``score_only``; at most ``max_seconds`` when given), score every snapshot in OUT, write
    OUT/curve.json, print the tables."""
    dataset, out = Path(dataset), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = {"dataset_dir": str(dataset), "bundle_root": str(out / "bundle"), "epoch_length": snapshot_every,
            "max_epochs": iterations // snapshot_every, **overrides}
    parser = stage_parser("train_diffusion", [f"presets/{preset}"], **keys)
    clip_x0 = stage_parser("sample_srds", [f"presets/{preset}"], **keys)["srds_clip_x0"]  # the sampler's default
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()
    if not score_only:
        train_with_snapshots(parser, out, snapshot_every, max_seconds)
    train_seconds = time.perf_counter() - t0
    posterior = dataset / "datalist_bsn_posterior.json"
    items = load_datalist(posterior if posterior.is_file() else dataset / "datalist_bsn.json", "test")
    curve = {}
    for snapshot in sorted(out.glob("diffusion_*.pt")):
        iteration = int(snapshot.stem.split("_")[1])
        curve[iteration] = score_snapshot(parser, snapshot, items, crop, steps, clip_x0)
        row = {m: round(float(np.mean(v["psnr"])), 2) for m, v in curve[iteration].items()
               if isinstance(v, dict) and "psnr" in v}
        leak = {k: round(float(np.mean(v)), 2) for k, v in curve[iteration]["leak"].items()}
        print(iteration, row, leak, flush=True)
    meta = {"dataset": str(dataset), "preset": preset, "overrides": overrides, "commit": commit, "crop": crop,
            "steps": steps, "clip_x0": clip_x0, "train_seconds": train_seconds, "max_seconds": max_seconds,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    (out / "curve.json").write_text(json.dumps({"meta": meta, "curve": curve}, indent=1))
    header = "| iterations | " + " | ".join(m for m in METHODS) + " | leak r(out - x_c, x' - x_c) SRDS / single |"
    rows = [header, "|" + "---|" * (len(METHODS) + 2)]
    for iteration, scores in curve.items():
        cells = [f"{np.mean(scores[m]['psnr']):.2f} / {np.mean(scores[m]['ssim']):.3f}" if m in scores else "-"
                 for m in METHODS]
        leak = scores["leak"]
        rows.append(f"| {iteration} | " + " | ".join(cells) + f" | {np.mean(leak['srds_vs_input_residual']):.2f} / "
                    f"{np.mean(leak['single_vs_input_residual']):.2f} |")
    print(f"\n{meta}\n" + "\n".join(rows))


if __name__ == "__main__":
    fire.Fire(main)
