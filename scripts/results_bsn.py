"""Stage-1 study for docs/results.md: noisy vs BSN on the studyforrest test split, i.i.d. and correlated noise.

Each case prepares the slices with a fixed noise realisation, trains the BSN with the given preset and a
noise overlay (blind spot 1 or 9), writes x_c (blind) and the stage-1 denoiser's output (x_c with the
hidden pixel re-injected, sigma estimated per slice) for every slice, and scores the test split against
the clean slices; the re-injection with the true sigma is scored too. Prints a markdown table; the raw
per-slice scores go to OUT/<case>/scores.json.

Usage: python scripts/results_bsn.py --preset cpu --out runs/results_bsn [--data ../shared/data] [--reuse]
(--reuse skips training where OUT/<case>/bundle/models/bsn.pt exists, and only reruns inference)
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import fire
import numpy as np
import torch

from diffdenoise.data import load_datalist, prepare
from diffdenoise.inferers import BlindSpotInferer, PosteriorReinjection
from diffdenoise.metrics import psnr, score_datalist, ssim
from diffdenoise.stages import run_stage

STUDYFORREST = "brain_mri_t1_axial_studyforrest/series"
# case name -> (noise arguments of `prepare`, noise overlay of the BSN)
CASES = {
    "gaussian_6_iid_bs1": ({"noise": "gaussian", "level": 6 / 255}, "noise/iid"),
    "gaussian_6_corr1.2_bs1": ({"noise": "gaussian", "level": 6 / 255, "correlation": 1.2}, "noise/iid"),
    "gaussian_6_corr1.2_bs9": ({"noise": "gaussian", "level": 6 / 255, "correlation": 1.2}, "noise/correlated"),
    # the "clean" studyforrest slices carry noise of their own, which caps every score at 6/255: the same
    # cases on references averaged over 2x2 blocks (their i.i.d. noise halved), and at the stronger 15/255
    "gaussian_6_iid_bs1_down2": ({"noise": "gaussian", "level": 6 / 255, "downsample": 2}, "noise/iid"),
    "gaussian_6_corr1.2_bs1_down2": ({"noise": "gaussian", "level": 6 / 255, "correlation": 1.2, "downsample": 2},
                                     "noise/iid"),
    "gaussian_6_corr1.2_bs9_down2": ({"noise": "gaussian", "level": 6 / 255, "correlation": 1.2, "downsample": 2},
                                     "noise/correlated"),
    "gaussian_15_iid_bs1": ({"noise": "gaussian", "level": 15 / 255}, "noise/iid"),
    # i.i.d. noise, 9x9 blind spot: a coarser x_c whose value near a pixel depends less on that pixel's noise, the
    # "larger blind spot for the condition only" remedy for the diffusion stage's leak (scripts/results_srds.py)
    "gaussian_6_iid_bs9": ({"noise": "gaussian", "level": 6 / 255}, "noise/correlated"),
    "gaussian_15_corr1.2_bs1": ({"noise": "gaussian", "level": 15 / 255, "correlation": 1.2}, "noise/iid"),
    "gaussian_15_corr1.2_bs9": ({"noise": "gaussian", "level": 15 / 255, "correlation": 1.2}, "noise/correlated"),
}


def known_sigma_scores(datalist, sigma: float) -> dict[str, np.ndarray]:
    """PSNR/SSIM of the test split's x_c re-injected with the true Gaussian sigma (the library's combine)."""
    combine = PosteriorReinjection(BlindSpotInferer(), "gaussian", level=sigma).combine
    scores = {"psnr": [], "ssim": []}
    for item in load_datalist(datalist, "test"):
        noisy, x_c, clean = (torch.from_numpy(np.load(item[k]))[None, None] for k in ("image", "bsn", "clean"))
        denoised = combine(x_c, noisy)[0, 0].numpy()
        scores["psnr"].append(psnr(denoised, clean[0, 0].numpy()))
        scores["ssim"].append(ssim(denoised, clean[0, 0].numpy()))
    return {m: np.array(v) for m, v in scores.items()}


def cell(scores: dict) -> str:
    """'PSNR / SSIM' means of one method, for the table."""
    return f"{scores['psnr'].mean():.2f} / {scores['ssim'].mean():.3f}"


def main(preset: str = "cpu", out: str = "runs/results_bsn", data: str = "../shared/data", cases: str = "all",
         reuse: bool = False, **overrides):
    """Run the cases (comma-separated names, or all) and print the table; ``--key value`` overrides config keys."""
    out = Path(out)
    names = list(CASES) if cases == "all" else cases.split(",")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = ["| case | blind spot | noisy PSNR / SSIM | BSN x_c (blind) | x_c + re-injection, sigma estimated | "
            "gain (dB) | same, true sigma | train+infer (s) |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        noise_args, overlay = CASES[name]
        dataset = out / name / "data"
        bundle_root = out / name / "bundle"
        if not (dataset / "datalist.json").is_file():
            prepare(Path(data) / STUDYFORREST, dataset, modality="mri", seed=0, progress=False, **noise_args)
        t0 = time.perf_counter()
        trained = reuse and (bundle_root / "models" / "bsn.pt").is_file()
        for stage in ("infer_bsn",) if trained else ("train_bsn", "infer_bsn"):
            run_stage(stage, [f"presets/{preset}", overlay], dataset_dir=str(dataset), bundle_root=str(bundle_root),
                      **overrides)
        seconds = time.perf_counter() - t0
        scores = score_datalist(dataset / "datalist_bsn_posterior.json", ["image", "bsn", "bsn_posterior"])
        scores["bsn_posterior_true_sigma"] = known_sigma_scores(dataset / "datalist_bsn.json", noise_args["level"])
        (out / name / "scores.json").write_text(
            json.dumps({k: {m: v.tolist() for m, v in s.items()} for k, s in scores.items()}))
        n, b, r, t = (scores[k] for k in ("image", "bsn", "bsn_posterior", "bsn_posterior_true_sigma"))
        spot = {"noise/iid": "1", "noise/correlated": "9x9"}[overlay]
        rows.append(f"| {name} | {spot} | {cell(n)} | {cell(b)} | {cell(r)} | "
                    f"{r['psnr'].mean() - n['psnr'].mean():+.2f} | {cell(t)} | "
                    f"{'infer only ' if trained else ''}{seconds:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(f"\npreset={preset} overrides={overrides} commit={commit}\n{table}")
    (out / "table.md").write_text(f"preset={preset} overrides={overrides} commit={commit}\n\n{table}\n")


if __name__ == "__main__":
    fire.Fire(main)
