"""PosteriorReinjection: the noise variances it relies on, its limits, and a real gain over both its inputs."""

import math

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F

from diffdenoise.inferers import BlindSpotInferer, PosteriorReinjection
from diffdenoise.metrics import psnr
from diffdenoise.networks import BlindSpotNet
from diffdenoise.noise import SyntheticNoise, noise_variance

SIGMA = 6 / 255


@pytest.fixture(scope="module")
def slice_pair(shared_data):
    """A studyforrest T1 slice scaled as `prepare` does (min..p99.9), with Gaussian 6/255 noise: (clean, noisy)."""
    pixels = pydicom.dcmread(shared_data / "brain_mri_t1_axial_studyforrest/series/N2D_0190.dcm").pixel_array
    clean = np.clip(pixels / np.percentile(pixels, 99.9), 0, 1).astype(np.float32)
    noisy = SyntheticNoise("gaussian", SIGMA, seed=0)(clean, image_id="N2D_0190")
    return torch.from_numpy(clean)[None, None], torch.from_numpy(noisy)[None, None]


class NeighbourMean(torch.nn.Module):
    """A blind estimate needing no training: the mean of the 8 neighbours (the centre tap is zero)."""

    def forward(self, x, pd_stride=None):
        kernel = torch.ones(1, 1, 3, 3) / 8
        kernel[..., 1, 1] = 0
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)


@pytest.mark.parametrize("model, level, correlation", [
    ("gaussian", SIGMA, 0.0), ("poisson", 200.0, 0.0), ("gamma", 100.0, 0.0), ("gaussian", SIGMA, 1.2),
    ("poisson", 200.0, 1.2),
])
def test_noise_variance_matches_the_noise_models(model, level, correlation):
    clean = np.full((256, 256), 0.6)
    noisy = SyntheticNoise(model, level, correlation_sigma=correlation, seed=1)(clean, image_id="flat")
    measured = np.var(noisy - clean)
    assert measured == pytest.approx(noise_variance(model, level, 0.6), rel=0.03)


def test_real_slice_beats_the_noisy_input_and_the_blind_estimate(slice_pair):
    clean, noisy = slice_pair
    blind = BlindSpotInferer()(noisy, NeighbourMean())
    known = PosteriorReinjection(BlindSpotInferer(), "gaussian", level=SIGMA)(noisy, NeighbourMean())
    estimated = PosteriorReinjection(BlindSpotInferer(), "gaussian", level=None)(noisy, NeighbourMean())
    score = {name: float(psnr(x[0, 0].numpy(), clean[0, 0].numpy())) for name, x in
             [("noisy", noisy), ("blind", blind), ("known", known), ("estimated", estimated)]}
    # measured at writing: noisy 32.6, blind 27.2, known sigma 35.0, estimated sigma 34.7 dB
    assert score["known"] > score["noisy"] + 1.5, score
    assert score["estimated"] > score["noisy"] + 1.0, score
    assert score["known"] > score["blind"] + 5.0, score


def test_limits_keep_the_estimate_on_flat_regions_and_the_input_on_large_residuals():
    torch.manual_seed(0)
    flat = torch.full((1, 1, 64, 64), 0.5)
    noisy = flat + SIGMA * torch.randn_like(flat)
    combine = PosteriorReinjection(BlindSpotInferer(), "gaussian", level=SIGMA, window=9).combine
    # the residual is pure noise: the prior spread is ~0, so the output stays near the flat estimate
    assert (combine(flat, noisy) - flat).abs().mean() < 0.2 * (noisy - flat).abs().mean()
    # an estimate 50 sigma off: the data say the prior is wide, so the output follows the input
    far = flat + 50 * SIGMA
    assert torch.allclose(combine(far, noisy), noisy, atol=0.01 * 50 * SIGMA)


def test_wraps_the_blind_inferer_with_a_trained_style_network():
    torch.manual_seed(0)
    net = BlindSpotNet(features=8, num_blocks=1, pd_stride=2).eval()
    x = torch.rand(2, 1, 30, 34)
    blind = BlindSpotInferer(pd_stride=2)
    denoiser = PosteriorReinjection(blind, "poisson", level=200.0)
    with torch.no_grad():
        expected = denoiser.combine(blind(x, net), x)
    assert torch.equal(denoiser(x, net), expected)
    assert expected.shape == x.shape


def _prior_net() -> BlindSpotNet:
    torch.manual_seed(0)
    return BlindSpotNet(features=8, num_blocks=1, pd_stride=2, prior_variance=True).eval()


@pytest.mark.parametrize("level", [SIGMA, None], ids=["known", "learned_level"])
def test_learned_prior_is_the_gaussian_posterior_at_the_blind_inferers_stride(level):
    net = _prior_net()
    with torch.no_grad():
        net.noise_log_scale.fill_(math.log(SIGMA**2))
    x = torch.rand(2, 1, 30, 34)
    denoiser = PosteriorReinjection(BlindSpotInferer(pd_stride=3), "gaussian", level, prior="learned")
    with torch.no_grad():
        mean, std = denoiser.posterior(x, net)
        mu, v = net.prior(x, pd_stride=3)
        out = denoiser(x, net)
    s2 = SIGMA**2
    torch.testing.assert_close(mean, (v * x + s2 * mu) / (v + s2))
    torch.testing.assert_close(std, (v * s2 / (v + s2)).sqrt())
    assert torch.equal(out, mean)
    assert bool((std <= SIGMA + 1e-6).all()), "seeing y never leaves more uncertainty than the noise"


def test_learned_prior_uses_the_signal_dependent_noise_at_mu():
    net = _prior_net()
    with torch.no_grad():
        net.noise_log_scale.fill_(math.log(1 / 300))  # lambda 300, learned
    x = torch.rand(1, 1, 20, 20)
    with torch.no_grad():
        mean = PosteriorReinjection(BlindSpotInferer(), "poisson", None, prior="learned")(x, net)
        mu, v = net.prior(x)
    s2 = mu.clamp(min=0) / 300
    torch.testing.assert_close(mean, (v * x + s2 * mu) / (v + s2))


def test_box_posterior_mean_is_the_unchanged_denoiser_and_its_std_is_small_where_flat():
    torch.manual_seed(0)
    flat = torch.full((1, 1, 64, 64), 0.5)
    noisy = flat + SIGMA * torch.randn_like(flat)
    denoiser = PosteriorReinjection(BlindSpotInferer(), "gaussian", level=SIGMA)
    mean, std = denoiser.posterior(noisy, NeighbourMean())
    assert torch.equal(mean, denoiser(noisy, NeighbourMean()))
    assert float(std.mean()) < 0.5 * SIGMA


@pytest.mark.parametrize("kwargs, message", [
    ({"noise": "speckle"}, "Set `noise`"),
    ({"prior": "gaussian"}, "Set `prior`"),
    ({"noise": "poisson", "level": None}, "Set `level`"),
    ({"noise": "gamma", "level": -1.0}, "level"),
    ({"window": 4}, "Set `window`"),
    ({"window": 0}, "Set `window`"),
])
def test_invalid_arguments_name_the_knob(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PosteriorReinjection(BlindSpotInferer(), **kwargs)
