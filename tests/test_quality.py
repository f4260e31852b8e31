"""No-reference error estimates (diffdenoise.quality) against the true error on a real slice with synthetic noise."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, median_filter

from diffdenoise.metrics import psnr
from diffdenoise.noise import SyntheticNoise
from diffdenoise.quality import estimate_gain, estimate_mse, psnr_from_mse

# denoisers of the shape ``diffdenoise.denoise.Model`` has: float32 (B, H, W) -> (B, H, W)
FILTERS = {
    "identity": lambda batch: batch,
    "blur": lambda batch: gaussian_filter(batch, (0, 1.0, 1.0)),  # too strong for 6/255 here: it loses 2 dB
    "light blur": lambda batch: gaussian_filter(batch, (0, 0.5, 0.5)),
    "median": lambda batch: np.stack([median_filter(s, 3) for s in batch]),
    # unsharp masking amplifies the noise: a denoiser that makes the image worse
    "sharpen": lambda batch: 2.0 * batch - gaussian_filter(batch, (0, 1.0, 1.0)),
}
CASES = [("gaussian", 6 / 255, 0.0), ("gaussian", 6 / 255, 1.2), ("poisson", 200.0, 0.0), ("gamma", 100.0, 0.0)]


@pytest.fixture(scope="module")
def brain(mri_slice):
    """The studyforrest slice's central 128 x 128, scaled so the brain is bright but not clipped."""
    return mri_slice[0, 0, 128:256, 70:198].numpy().astype(np.float64) * 0.9


def _noisy(clean, model, level, corr, count=4):
    noise = SyntheticNoise(model, level, corr, seed=3)
    return [noise(clean, image_id=f"slice-{k}").astype(np.float32) for k in range(count)]


@pytest.mark.parametrize("model, level, corr", CASES, ids=["gaussian", "correlated", "poisson", "gamma"])
def test_estimated_psnr_is_within_a_few_tenths_of_a_db_of_the_true_psnr(brain, model, level, corr):
    noisy = _noisy(brain, model, level, corr)
    for name, denoiser in FILTERS.items():
        true = np.mean([psnr(np.clip(denoiser(y[None])[0], 0, 1), brain) for y in noisy])
        estimated = psnr_from_mse(estimate_mse(denoiser, noisy, model, level, corr)).mean()
        assert abs(estimated - true) < 0.3, (name, estimated, true)


def test_the_gain_tells_a_helping_denoiser_from_a_harmful_one(brain):
    noisy = _noisy(brain, "gaussian", 6 / 255, 0.0)
    assert estimate_gain(FILTERS["light blur"], noisy, "gaussian", 6 / 255).gain_db > 1.0
    assert estimate_gain(FILTERS["blur"], noisy, "gaussian", 6 / 255).gain_db < -1.0
    assert estimate_gain(FILTERS["sharpen"], noisy, "gaussian", 6 / 255).gain_db < -1.0


def test_a_seeded_stochastic_denoiser_is_estimated_like_a_deterministic_one(brain):
    """Every inferer here reseeds its draws per call (SRDS, antithetic Tweedie): the two calls of the estimate
    then see the same draws, and the divergence is that of a fixed function."""
    def stochastic(batch):
        g = torch.Generator().manual_seed(0)
        jitter = 0.02 * torch.randn(batch.shape, generator=g).numpy()
        return gaussian_filter(batch + jitter, (0, 1.0, 1.0))

    noisy = _noisy(brain, "gaussian", 6 / 255, 0.0)
    true = np.mean([psnr(np.clip(stochastic(y[None])[0], 0, 1), brain) for y in noisy])
    assert abs(psnr_from_mse(estimate_mse(stochastic, noisy, "gaussian", 6 / 255)).mean() - true) < 0.3


def test_models_without_an_estimate_say_so():
    y = [np.full((32, 32), 0.5, dtype=np.float32)]
    with pytest.raises(ValueError, match="correlated poisson"):
        estimate_mse(FILTERS["identity"], y, "poisson", 200.0, correlation_sigma=1.2)
    with pytest.raises(ValueError, match="must be > 0"):
        estimate_mse(FILTERS["identity"], y, "gaussian", 0.0)
