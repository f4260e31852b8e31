"""Baselines DiffDenoise is compared against: classical filters and self-supervised U-Nets (noisy data only)."""

from diffdenoise.baselines.classical import denoise_bm3d, denoise_nlm, denoise_tv
from diffdenoise.baselines.neighbor2neighbor import denoise_neighbor2neighbor, train_neighbor2neighbor
from diffdenoise.baselines.noise2self import denoise_noise2self, train_noise2self

__all__ = [
    "denoise_bm3d",
    "denoise_neighbor2neighbor",
    "denoise_nlm",
    "denoise_noise2self",
    "denoise_tv",
    "train_neighbor2neighbor",
    "train_noise2self",
]
