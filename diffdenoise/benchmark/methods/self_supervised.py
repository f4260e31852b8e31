"""The in-house self-supervised baselines: U-Nets trained on the case's noisy training slices alone."""

from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

from diffdenoise.baselines import (
    denoise_neighbor2neighbor,
    denoise_noise2self,
    train_neighbor2neighbor,
    train_noise2self,
)
from diffdenoise.benchmark.methods.base import Denoiser
from diffdenoise.convergence import CURVE_SUFFIX, TrainingCurve
from diffdenoise.data import load_datalist


def _train(train: Callable, name: str, train_noisy, workdir, settings):
    """``train`` with the preset's knobs. With a ``convergence_rule`` among them (``PlateauRule`` arguments, or None to
    record only), it validates on the case's held-out noisy validation slices, stops by the rule (``iterations``
    the cap) and leaves its curve in ``workdir`` for the result; without one it runs ``iterations`` as before."""
    options = dict(settings.options)
    if "convergence_rule" not in options:
        return train(train_noisy, seed=settings.seed, **options)
    curve = TrainingCurve.from_settings(options.pop("convergence_rule"))
    validation = [np.load(item["image"]) for item in load_datalist(settings.dataset_dir / "datalist.json", "validation")]
    network = train(train_noisy, seed=settings.seed, validation=validation, curve=curve, **options)
    curve.save(workdir / f"{name}{CURVE_SUFFIX}")
    return network


def fit_noise2self(train_noisy, workdir, settings) -> Denoiser:
    """A Noise2Self U-Net trained on the noisy training slices; knobs (iterations, widths...) from the preset."""
    return partial(denoise_noise2self, _train(train_noise2self, "noise2self", train_noisy, workdir, settings))


def fit_neighbor2neighbor(train_noisy, workdir, settings) -> Denoiser:
    """A Neighbor2Neighbor U-Net trained on the noisy training slices; knobs from the preset."""
    network = _train(train_neighbor2neighbor, "neighbor2neighbor", train_noisy, workdir, settings)
    return partial(denoise_neighbor2neighbor, network)
