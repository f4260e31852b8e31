"""deepinv's own self-supervised losses, trained as the in-house U-Net baselines are, then serving denoised slices.

Run with the peers' environment's python (``scripts/baselines_env.sh``), never imported by the product: deepinv
imports torchvision, which does not load on this project's CPU torch build. ``diffdenoise.benchmark.methods.
deepinv_peers`` starts it. Only the loss is deepinv's: the network (MONAI ``BasicUNet``), crops, batches, seeds and
the Adam loop are ``diffdenoise.baselines._unet``'s, the ones Noise2Self and Neighbor2Neighbor train with, so a
score gap between a deepinv method and an in-house one comes from the loss.

Losses (``deepinv.loss``): ``r2r`` is ``R2RLoss`` (GR2R: Gaussian, Poisson or Gamma recorruption), denoising
with its ``R2RModel`` (the mean over ``eval_n_samples`` recorruptions); ``n2n`` is ``Neighbor2Neighbor``, whose
``gamma`` is ramped from 0 over the iterations as the paper and the in-house trainer do (deepinv keeps it
fixed; its loss reads ``gamma`` on every call); ``sure`` is ``SureGaussianLoss`` or ``SurePoissonLoss``.
Noise levels use ``diffdenoise.noise``'s units: sigma, Poisson lambda (deepinv's gain = 1 / lambda), Gamma
alpha = beta (deepinv's ``l``).

Protocol: train on every ``.npy`` slice in ``--train``, write ``--log`` (versions, per-step losses, seconds),
then print ``ready`` on stdout; for each stdin line ``IN<TAB>OUT`` denoise the ``(H, W)`` slice in ``IN``, save
it to ``OUT`` and print ``OUT``; exit at end of input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import deepinv
import numpy as np
import torch

from diffdenoise.baselines import _unet

_DEFAULTS = {"device": "cpu", "patch_size": 64, "batch_size": 8, "lr": 3e-4, "features": _unet.DEFAULT_FEATURES}


def noise_model(noise: str, level: float | None) -> deepinv.physics.NoiseModel:
    """deepinv's model of this project's noise (``diffdenoise.noise`` units)."""
    if level is None or noise not in ("gaussian", "poisson", "gamma"):
        raise ValueError(f"deepinv's R2R and SURE need i.i.d. gaussian, poisson or gamma noise of known level, got "
                         f"{noise!r} at level {level!r}; limit this method with the preset's method_cases")
    if noise == "gaussian":
        return deepinv.physics.GaussianNoise(sigma=level)
    if noise == "poisson":
        return deepinv.physics.PoissonNoise(gain=1.0 / level)
    return deepinv.physics.GammaNoise(l=level)


def build_loss(name: str, noise: str, level: float | None, options: dict) -> deepinv.loss.Loss:
    """The deepinv loss ``name`` with its knobs popped from ``options`` (what is left goes to the trainer)."""
    if name == "n2n":
        return deepinv.loss.Neighbor2Neighbor(gamma=options.pop("gamma", 2.0))
    model = noise_model(noise, level)
    if name == "r2r":
        return deepinv.loss.R2RLoss(noise_model=model, alpha=options.pop("alpha", 0.15),
                                    eval_n_samples=options.pop("eval_n_samples", 5))
    if noise == "gaussian":
        return deepinv.loss.SureGaussianLoss(sigma=level, tau=options.pop("tau", 1e-2))
    if noise == "poisson":
        return deepinv.loss.SurePoissonLoss(gain=1.0 / level, tau=options.pop("tau", 1e-3))
    raise ValueError(f"deepinv has no SURE loss for {noise!r} noise; use deepinv_r2r, or limit deepinv_sure with "
                     "the preset's method_cases")


class _Reconstructor(torch.nn.Module):
    """The U-Net in deepinv's model signature ``model(y, physics, **kwargs)``."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, y, physics=None, **kwargs):
        return self.network(y)


def train(name: str, loss: deepinv.loss.Loss, physics, images: list[np.ndarray], iterations: int, seed: int,
          options: dict, losses: list[float]) -> torch.nn.Module:
    """``_unet.fit`` with deepinv's loss; returns the model deepinv denoises with (R2R's averages recorruptions).

    deepinv's losses draw their masks and noise from the global torch generator, seeded here from ``seed``.
    """
    final_gamma = loss.gamma if name == "n2n" else None

    def step(network, batch, done, generator):
        model = loss.adapt_model(_Reconstructor(network))
        if name == "n2n":
            loss.gamma = final_gamma * done
            return loss(y=batch, physics=physics, model=model)
        x_net = model(batch, physics, update_parameters=True)
        return loss(x_net=x_net, y=batch, physics=physics, model=model).mean()

    torch.manual_seed(seed)
    network = _unet.fit(images, iterations, step, patch_multiple=(2 if name == "n2n" else 1) * _unet.DOWNSAMPLING,
                        seed=seed, progress=False, callback=lambda e: losses.append(e["loss"]),
                        desc=f"deepinv {name}", **{**_DEFAULTS, **options})
    return loss.adapt_model(_Reconstructor(network)).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=("r2r", "n2n", "sure"), required=True)
    parser.add_argument("--noise", default="gaussian", help="gaussian | poisson | gamma (diffdenoise.noise names)")
    parser.add_argument("--level", type=float, default=None, help="sigma | lambda | alpha, as diffdenoise.noise")
    parser.add_argument("--train", type=Path, required=True, help="folder of noisy (H, W) .npy training slices")
    parser.add_argument("--options", default="{}", help="JSON: iterations, patch_size, batch_size, lr, features "
                                                        "and the loss's knobs (gamma | alpha, eval_n_samples | tau)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    reply, sys.stdout = sys.stdout, sys.stderr  # stdout carries the protocol alone
    torch.set_num_threads(args.threads)
    options = json.loads(args.options)
    iterations = options.pop("iterations")
    loss = build_loss(args.loss, args.noise, args.level, options)
    physics = deepinv.physics.Denoising()  # the identity; R2R and SURE carry their own noise model
    images = [np.load(path) for path in sorted(args.train.glob("*.npy"))]
    started, losses = time.perf_counter(), []
    model = train(args.loss, loss, physics, images, iterations, args.seed, options, losses)
    args.log.write_text(json.dumps({"torch": torch.__version__, "deepinv": deepinv.__version__,
                                    "fit_seconds": time.perf_counter() - started, "losses": losses}))
    print("ready", file=reply, flush=True)
    for line in sys.stdin:
        source, target = line.rstrip("\n").split("\t")
        x = _unet.image_tensor(np.load(source), model)
        np.save(target, _unet.to_image(_unet.predict(partial(model, physics=physics), x)))
        print(target, file=reply, flush=True)


if __name__ == "__main__":
    main()
