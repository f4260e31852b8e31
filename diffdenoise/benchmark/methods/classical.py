"""Methods that train nothing: the noisy input (the floor) and the classical filters (NLM, TV, BM3D)."""

from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

from diffdenoise.benchmark.methods.base import Denoiser


def fit_input(train_noisy, workdir, settings) -> Denoiser:
    """The noisy input itself: the floor every method must beat."""
    return np.asarray


def fit_filter(denoise: Callable) -> Callable:
    """A classical filter needs no training; its knobs (``sigma``: None estimates it per slice) come from the preset."""

    def fit(train_noisy, workdir, settings) -> Denoiser:
        return partial(denoise, **settings.options)

    return fit
