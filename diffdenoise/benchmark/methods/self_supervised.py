"""The in-house self-supervised baselines: U-Nets trained on the case's noisy training slices alone."""

from __future__ import annotations

from functools import partial

from diffdenoise.baselines import (
    denoise_neighbor2neighbor,
    denoise_noise2self,
    train_neighbor2neighbor,
    train_noise2self,
)
from diffdenoise.benchmark.methods.base import Denoiser


def fit_noise2self(train_noisy, workdir, settings) -> Denoiser:
    """A Noise2Self U-Net trained on the noisy training slices; knobs (iterations, widths...) from the preset."""
    return partial(denoise_noise2self, train_noise2self(train_noisy, seed=settings.seed, **settings.options))


def fit_neighbor2neighbor(train_noisy, workdir, settings) -> Denoiser:
    """A Neighbor2Neighbor U-Net trained on the noisy training slices; knobs from the preset."""
    network = train_neighbor2neighbor(train_noisy, seed=settings.seed, **settings.options)
    return partial(denoise_neighbor2neighbor, network)
