"""Can the likelihood learn the noise level? The experiment behind diffdenoise.prior_likelihood's rule (issue 17).

Trains a 16-feature learned-prior BSN on 48x48 crops of one noisy studyforrest slice with the level unknown and
*forced* to learn (the bundle learns only Gaussian/Rician levels), printing the level every 100 steps and the
posterior's PSNR at the end. ``--start pca`` starts at the patch-PCA estimate (as the bundle does), ``fixed`` at
BlindSpotNet's 25/255-equivalent; ``--rate`` multiplies the level's learning rate (the first version used 10).

    OMP_NUM_THREADS=1 python scripts/learned_level_drift.py poisson 200 --steps 1000 --start pca --rate 1
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pydicom
import torch

from diffdenoise.data import normalise
from diffdenoise.inferers import BlindSpotInferer, PosteriorReinjection, PriorInferer
from diffdenoise.metrics import psnr
from diffdenoise.networks import BlindSpotNet
from diffdenoise.noise import SyntheticNoise
from diffdenoise.noise_level import estimate_noise_level
from diffdenoise.prior_likelihood import PriorLikelihoodLoss, learned_noise_level, log_scale_from_level

SLICE = "brain_mri_t1_axial_studyforrest/series/N2D_0190.dcm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("noise", choices=["gaussian", "poisson", "gamma"])
    parser.add_argument("level", type=float, help="sigma (in [0, 1] units) | lambda | alpha")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--start", choices=["pca", "fixed"], default="pca")
    parser.add_argument("--rate", type=float, default=1.0, help="the level's learning rate / the network's")
    parser.add_argument("--data", default="../shared/data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clean = normalise(pydicom.dcmread(f"{args.data}/{SLICE}").pixel_array.astype(np.float32)[None], "mri")[0]
    noisy = SyntheticNoise(args.noise, args.level, seed=0)(clean, image_id="slice").astype(np.float32)
    y = torch.from_numpy(noisy)[None, None]
    torch.manual_seed(0)
    net = BlindSpotNet(features=16, num_blocks=2, prior_variance=True)
    if args.start == "pca":
        with torch.no_grad():
            net.noise_log_scale.fill_(log_scale_from_level(estimate_noise_level([noisy], args.noise), args.noise))
    print(f"start: level {learned_noise_level(net, args.noise):.4g} (true {args.level:g})")
    loss_fn = PriorLikelihoodLoss(args.noise, None, net.noise_log_scale)
    weights = [p for p in net.parameters() if p is not net.noise_log_scale]
    optimizer = torch.optim.Adam([{"params": weights}, {"params": [net.noise_log_scale], "lr": 3e-3 * args.rate}],
                                 lr=3e-3)
    g = torch.Generator().manual_seed(2)
    h, w = y.shape[-2:]
    for step in range(1, args.steps + 1):
        rows, cols = torch.randint(0, h - 47, (8,), generator=g), torch.randint(0, w - 47, (8,), generator=g)
        batch = torch.cat([y[..., r : r + 48, c : c + 48] for r, c in zip(rows.tolist(), cols.tolist())])
        loss = loss_fn(PriorInferer()(batch, net), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step}: level {learned_noise_level(net, args.noise):.4g}", flush=True)
    net.eval()
    with torch.no_grad():
        posterior = PosteriorReinjection(BlindSpotInferer(), args.noise, None, prior="learned")(y, net)
    print(f"PSNR noisy {psnr(noisy, clean):.2f}, learned-level posterior {psnr(posterior[0, 0], clean):.2f} dB "
          f"(level {learned_noise_level(net, args.noise):.4g}, true {args.level:g}; log-level change "
          f"{math.log(learned_noise_level(net, args.noise) / args.level):+.2f})")


if __name__ == "__main__":
    main()
