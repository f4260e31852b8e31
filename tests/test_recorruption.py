"""The recorrupted splits are unbiased and their input and target noises are uncorrelated (flat images, numerically)."""

import math

import numpy as np
import pytest
import torch

from diffdenoise.noise import SyntheticNoise
from diffdenoise.recorruption import band_timesteps, make_recorruption, schedule_rho, timestep_for_rho

FLAT = 0.4
CASES = [("gaussian", 6 / 255, 0.0), ("gaussian", 6 / 255, 1.2), ("poisson", 200.0, 0.0), ("gamma", 100.0, 0.0)]


def _noisy(model, level, correlation, size=256, copies=8):
    noise = SyntheticNoise(model, level, correlation_sigma=correlation, seed=0)
    flat = np.full((1, size, size), FLAT, dtype=np.float32)
    return torch.stack([torch.as_tensor(noise(flat, image_id=f"flat-{k}")) for k in range(copies)])


@pytest.mark.parametrize("model,level,correlation", CASES)
@pytest.mark.parametrize("rho", [0.25, 1.5])
def test_split_is_unbiased_and_target_noise_is_independent_of_the_input(model, level, correlation, rho):
    y = _noisy(model, level, correlation)
    recorruption = make_recorruption(model, level, correlation)
    torch.manual_seed(0)
    z, target = recorruption.split(y, recorruption.draw(y), torch.full((len(y),), rho))
    input_noise, target_noise = (z - FLAT).double(), (target - FLAT).double()
    # means: x, within 4 standard errors (from the per-image means: valid for correlated noise too)
    for noise in (input_noise, target_noise):
        per_image = noise.flatten(1).mean(dim=1)
        assert abs(float(per_image.mean())) < 4 * float(per_image.std()) / math.sqrt(len(per_image))
    # the input's noise variance is (1 + rho^2) times the data's, and the target's is as stated
    data_variance = float((y.double() - FLAT).var())
    assert float(input_noise.var()) == pytest.approx((1 + rho**2) * data_variance, rel=0.03)
    expected = float(recorruption.target_noise_variance(torch.full_like(y, FLAT), torch.full((len(y),), rho)).mean())
    assert float(target_noise.var()) == pytest.approx(expected, rel=0.05)
    # uncorrelated: the correlation of the two noises, pixel by pixel and with the neighbours (shifts)
    for shift in (0, 1, 2):
        a, b = input_noise, torch.roll(target_noise, shift, dims=-1)
        corr = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
        assert abs(corr) < 0.01, (shift, corr)


@pytest.mark.parametrize("model,level,correlation", CASES)
def test_antithetic_state_mirrors_the_split(model, level, correlation):
    y = _noisy(model, level, correlation, size=64, copies=2)
    recorruption = make_recorruption(model, level, correlation)
    state = recorruption.draw(y, torch.Generator().manual_seed(1))
    rho = torch.full((2,), 0.5)
    z_plus, _ = recorruption.split(y, state, rho)
    z_minus, _ = recorruption.split(y, recorruption.antithetic(state), rho)
    # the two members' added noises are strongly negatively correlated (exactly -1 for Gaussian)
    a, b = (z_plus - y).flatten().double(), (z_minus - y).flatten().double()
    corr = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
    assert corr < (-0.999 if model == "gaussian" else -0.8)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="no exact recorruption"):
        make_recorruption("poisson", 200.0, 1.2)
    with pytest.raises(ValueError, match="noise_level"):
        make_recorruption("gaussian", None)
    with pytest.raises(ValueError, match="not one of"):
        make_recorruption("speckle", 1.0)
    from monai.networks.schedulers import DDIMScheduler

    abar = DDIMScheduler().alphas_cumprod
    with pytest.raises(ValueError, match="widen the band"):
        band_timesteps(abar, (1e-5, 2e-5))
    rho = schedule_rho(abar)
    t = band_timesteps(abar, (0.25, 1.5))
    assert float(rho[t].min()) >= 0.25 and float(rho[t].max()) <= 1.5 and len(t) > 100
    assert abs(float(rho[timestep_for_rho(abar, 0.5)]) - 0.5) < 0.01
