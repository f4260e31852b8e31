"""The leak diagnostics of the diffusion stage (scripts/results_srds.py): the correlation and its counterfactual."""

import numpy as np

from diffdenoise.metrics import input_shrinkage, noise_leak


def _images():
    rng = np.random.default_rng(0)
    x_c = rng.random((64, 64))
    noisy = x_c + 0.05 * rng.standard_normal(x_c.shape)
    return rng, x_c, noisy


def test_an_output_that_keeps_a_share_of_the_input_residual_is_its_own_shrinkage():
    _, x_c, noisy = _images()
    output = x_c + 0.3 * (noisy - x_c)
    slope, shrunk = input_shrinkage(output, noisy, x_c)
    assert abs(slope - 0.3) < 1e-12 and np.allclose(shrunk, output)
    assert noise_leak(output, noisy, x_c) > 0.999


def test_an_output_independent_of_the_input_noise_shrinks_to_the_condition():
    rng, x_c, noisy = _images()
    output = x_c + 0.05 * rng.standard_normal(x_c.shape)  # new noise, not the input's
    slope, shrunk = input_shrinkage(output, noisy, x_c)
    assert abs(slope) < 0.05 and np.abs(shrunk - x_c).max() < 0.05 * np.abs(noisy - x_c).max()
    assert abs(noise_leak(output, noisy, x_c)) < 0.05
