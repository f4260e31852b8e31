"""Test-time pixel-shuffle strides (AP-BSN's asymmetric PD) and R3 refinement for one trained BSN case.

Reads a case folder of scripts/results_bsn.py (its data/ and bundle/), applies the trained BSN with each
test-time variant to the test split and prints mean PSNR/SSIM against the clean slices.

Usage: python scripts/bsn_test_time_pd.py runs/results_bsn/gaussian_6_corr1.2_bs9 --overlay noise/correlated
"""

from __future__ import annotations

from pathlib import Path

import fire
import numpy as np
import torch

from diffdenoise.data import load_datalist
from diffdenoise.inferers import BlindSpotInferer
from diffdenoise.metrics import psnr, ssim
from diffdenoise.stages import stage_parser

# name -> BlindSpotInferer arguments
VARIANTS = {
    "PD5": {"pd_stride": 5},
    "PD2": {"pd_stride": 2},
    "PD1": {"pd_stride": 1},
    "PD2 + R3 (8 passes)": {"pd_stride": 2, "refine_passes": 8},
}


def main(case: str, overlay: str = "noise/correlated", preset: str = "cpu"):
    """Print one markdown row per test-time variant."""
    case = Path(case)
    parser = stage_parser("infer_bsn", [f"presets/{preset}", overlay], bundle_root=str(case / "bundle"))
    network = parser.get_parsed_content("bsn_def")
    network.load_state_dict(torch.load(case / "bundle" / "models" / "bsn.pt", weights_only=True))
    network.eval()
    items = load_datalist(case / "data" / "datalist.json", "test")
    print("| test-time variant | PSNR | SSIM |\n|---|---|---|")
    for name, arguments in VARIANTS.items():
        inferer = BlindSpotInferer(**arguments)
        scores = []
        for item in items:
            noisy, clean = torch.from_numpy(np.load(item["image"]))[None, None], np.load(item["clean"])
            with torch.inference_mode():
                out = inferer(noisy, network)[0, 0].numpy()
            scores.append((psnr(out, clean), ssim(out, clean)))
        p, s = np.mean(scores, axis=0)
        print(f"| {name} | {p:.2f} | {s:.3f} |", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
