"""The antithetic Tweedie inferer of the leak-free path: the pairing, the head's scale, rho's choice, its errors."""

import json

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from diffdenoise.inferers import AntitheticTweedieInferer
from diffdenoise.inferers.tweedie import pick_rho, recorrupted_x0, windowed
from diffdenoise.recorruption import make_recorruption

SIGMA = 6 / 255


class Zero(torch.nn.Module):
    """f = 0: the head returns its input z unchanged."""

    def forward(self, x, timesteps):
        return torch.zeros_like(x[:, :1])


class Scaled(torch.nn.Module):
    """f = a z[channel 0] + b: a linear network with one learnable gain, for rho's choice."""

    def __init__(self, a=0.0, b=0.0):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(a)), torch.nn.Parameter(torch.tensor(b))

    def forward(self, x, timesteps):
        return self.a * x[:, :1] + self.b


class SeenSizes(Scaled):
    """A pixel-wise network that records the spatial size of every input it is given."""

    def __init__(self):
        super().__init__(0.7, 0.01)
        self.sizes = set()

    def forward(self, x, timesteps):
        self.sizes.add(tuple(x.shape[2:]))
        return super().forward(x, timesteps) * (1 + timesteps.reshape(-1, 1, 1, 1) / 1000)


def test_windowed_stage3_sees_only_windows_and_matches_whole_slices_for_a_pixelwise_net():
    """In windows of the training crop the network never sees more than the crop; a pixel-wise network gives
    the whole-slice result (the Gaussian blend of equal values), so windowing changes only the field of view."""
    y = torch.rand(1, 1, 70, 52, generator=torch.Generator().manual_seed(0))
    common = dict(rho=0.5, num_pairs=2, pad_multiple=4, condition_fn=lambda z: 0.5 * z)
    whole_net, windowed_net = SeenSizes(), SeenSizes()
    whole = AntitheticTweedieInferer(make_recorruption("gaussian", SIGMA), DDIMScheduler(), **common)(y, whole_net)
    tiles = AntitheticTweedieInferer(make_recorruption("gaussian", SIGMA), DDIMScheduler(), roi_size=(32, 32),
                                     **common)(y, windowed_net)
    assert whole_net.sizes == {(72, 52)} and windowed_net.sizes == {(32, 32)}
    torch.testing.assert_close(tiles, whole, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one timestep"):
        windowed(SeenSizes(), (32, 32))(torch.rand(2, 1, 40, 40), torch.tensor([3, 4]))


@pytest.mark.parametrize("model,level", [("gaussian", SIGMA), ("poisson", 200.0), ("gamma", 100.0)])
def test_identity_head_averages_a_pair_back_to_about_the_input(model, level):
    """With f = 0 each member is its recorrupted z; a Gaussian pair averages exactly to y, the others nearly."""
    y = 0.2 + 0.6 * torch.rand(1, 1, 24, 20, generator=torch.Generator().manual_seed(0))
    if model == "poisson":
        y = torch.round(y * level) / level
    inferer = AntitheticTweedieInferer(make_recorruption(model, level), DDIMScheduler(), rho=0.5, num_pairs=2,
                                       pad_multiple=8)
    out = inferer(y, Zero())
    assert out.shape == y.shape
    if model == "gaussian":
        torch.testing.assert_close(out, y, atol=1e-6, rtol=0)
    else:  # mirrored quantiles: the pair's added noises nearly cancel
        assert float((out - y).abs().mean()) < 0.2 * float(y.mean()) / level**0.5


def test_head_scale_makes_the_true_eps_give_the_target():
    """For Gaussian noise z - y~ = sigma (rho + 1 / rho) eps, so an f that returns eps yields h = y~ exactly."""
    recorruption = make_recorruption("gaussian", SIGMA)
    y = torch.rand(2, 1, 8, 8)
    eps = recorruption.draw(y, torch.Generator().manual_seed(1))
    rho = torch.tensor([0.3, 1.2])
    z, target = recorruption.split(y, eps, rho)
    h = recorrupted_x0(lambda inputs, timesteps: eps, z, torch.tensor([5, 50]), rho, recorruption.sigma_ref)
    torch.testing.assert_close(h, target)


def test_repeatable_and_refuses_a_condition_computed_from_y():
    inferer = AntitheticTweedieInferer(make_recorruption("gaussian", SIGMA), DDIMScheduler(), rho=[0.5, 1.0], seed=3,
                                       condition_fn=lambda z: z * 0.5)
    net = Scaled(0.1, 0.0)
    y = torch.rand(1, 1, 16, 16)
    assert torch.equal(inferer(y, net), inferer(y, net))
    with pytest.raises(ValueError, match="condition"):
        inferer(y, net, condition=y)
    with pytest.raises(ValueError, match="num_pairs"):
        AntitheticTweedieInferer(make_recorruption("gaussian", SIGMA), DDIMScheduler(), num_pairs=0)


def test_pick_rho_prefers_the_better_estimate_and_caches_it(tmp_path):
    """f = 0 returns z, whose MSE grows with rho: the smallest candidate wins; the cache is read back."""
    recorruption = make_recorruption("gaussian", SIGMA)
    slices = [0.5 + SIGMA * torch.randn(128, 128, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    cache = tmp_path / "diffusion.pt.rho.json"
    rho = pick_rho(Scaled(), recorruption, DDIMScheduler(), lambda: slices, [0.25, 1.0], cache=cache)
    assert rho == pytest.approx(0.25, abs=0.02)
    stored = json.loads(cache.read_text())
    assert len(stored["estimated_mse"]) == 2
    # MSE of z = y + rho sigma eps against x is (1 + rho^2) sigma^2; the estimate subtracts a term 17 times larger
    # at rho 0.25, so over 131k pixel draws it holds it within about 20% (4 standard errors)
    for value, estimate in stored["estimated_mse"].items():
        assert estimate == pytest.approx((1 + float(value) ** 2) * SIGMA**2, rel=0.2)
    stored["rho"] = 0.77
    cache.write_text(json.dumps(stored))
    # a matching cache is read without the slices
    assert pick_rho(Scaled(), recorruption, DDIMScheduler(), lambda: 1 / 0, [0.25, 1.0], cache=cache) == 0.77
