"""SRDSInferer: DDIM math against closed forms, a Gaussian oracle, batching, seeding and validation.

The oracle is the exact eps predictor for a Gaussian target r ~ N(mu, s^2 I), so the tests do not depend on
training. With sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t) and x̄ = x / sqrt(ᾱ_t) it reads
eps* = sigma (x̄ - mu) / (s^2 + sigma^2), and one DDIM step scales d = x̄ - mu by
(s^2 + sigma_t sigma_prev) / (s^2 + sigma_t^2). A run from x_T = eps therefore ends at
x_0 = mu + G (eps / sqrt(ᾱ_T) - mu), G the product of those factors: SRDS returns mu - G mu (a bias of order
s sqrt(ᾱ_T)), and one sample has std G / sqrt(ᾱ_T) (-> s as the steps grow).
"""

import math

import pytest
import torch
from monai.data import MetaTensor
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from diffdenoise.inferers.srds import SRDSInferer

S = 0.3  # std of the oracle's Gaussian target


class Oracle(nn.Module):
    """Exact eps predictor for r ~ N(mu, S^2 I); mu is the condition channel unless fixed."""

    def __init__(self, scheduler: DDIMScheduler, mu: torch.Tensor | None = None):
        super().__init__()
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.mu = mu

    def forward(self, x, timesteps):
        c = x.shape[1] // 2
        x_t, cond = x[:, :c], x[:, c:]
        mu = cond if self.mu is None else self.mu
        ab = self.alphas_cumprod.to(x.device)[timesteps].to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * S**2 + 1 - ab)


class Spy(nn.Module):
    """Records every network input and timestep batch, and predicts a smooth non-linear eps."""

    def __init__(self):
        super().__init__()
        self.inputs, self.timesteps = [], []

    def forward(self, x, timesteps):
        self.inputs.append(x.clone())
        self.timesteps.append(timesteps.clone())
        c = x.shape[1] // 2
        return 0.5 * torch.tanh(x[:, :c] + x[:, c:])


class Zero(nn.Module):
    """Predicts no noise, so each DDIM step only rescales x_t by sqrt(ᾱ_prev / ᾱ_t)."""

    def forward(self, x, timesteps):
        return torch.zeros_like(x[:, : x.shape[1] // 2])


def smooth_pattern(batch: int = 1, size: int = 16) -> torch.Tensor:
    """A per-pixel mean mu in about [-1, 1.5], (batch, 1, size, size), float64."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    mu = torch.sin(2 * math.pi * xx) * torch.cos(math.pi * yy) + 0.5 * yy
    return mu.double().expand(batch, 1, size, size).clone()


def oracle_gain(scheduler: DDIMScheduler, inferer: SRDSInferer) -> float:
    """G: the factor DDIM applies to x̄_T - mu on the oracle, from the alphas (module docstring)."""
    ab = scheduler.alphas_cumprod.double()
    sig = [math.sqrt((1 - ab[t]) / ab[t]) for t in inferer.timesteps] + [0.0]  # final ᾱ = 1: sigma = 0
    return math.prod((S**2 + a * b) / (S**2 + a * a) for a, b in zip(sig[:-1], sig[1:]))


def randn(shape, seed, dtype=torch.float64):
    """Seeded test data, independent of the inferer's own generator."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def scheduler():
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False)


# --- timesteps and the DDIM update -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, start, expected",
    [
        (10, None, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        (5, 500, [500, 375, 250, 125, 0]),
        (1, None, [999]),
        (1, 0, [0]),
    ],
)
def test_timesteps_evenly_spaced(scheduler, steps, start, expected):
    assert SRDSInferer(scheduler, steps, start_timestep=start).timesteps.tolist() == expected


def test_first_two_updates_match_closed_form(scheduler):
    spy, ab = Spy(), scheduler.alphas_cumprod.double()
    x_c, noise = randn((2, 1, 8, 8), 1), randn((2, 1, 8, 8), 2)
    SRDSInferer(scheduler, 10, target="image").sample(x_c, spy, x_c, noise)

    assert [int(t[0]) for t in spy.timesteps[:3]] == [999, 888, 777]  # MONAI's step() would use 899 after 999
    assert all((t == t[0]).all() and t.dtype == torch.long for t in spy.timesteps)
    x = noise
    for i, (t, t_prev) in enumerate([(999, 888), (888, 777)]):
        assert torch.equal(spy.inputs[i][:, :1], x)
        eps = 0.5 * torch.tanh(x + x_c)
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        x = ab[t_prev].sqrt() * x0 + (1 - ab[t_prev]).sqrt() * eps
        torch.testing.assert_close(spy.inputs[i + 1][:, :1], x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_zero_network_closed_form(set_alpha_to_one):
    # eps_hat = 0: x_prev = sqrt(ᾱ_prev / ᾱ_t) x_t; the ratios telescope to x_0 = eps sqrt(ᾱ_final / ᾱ_T).
    scheduler = DDIMScheduler(set_alpha_to_one=set_alpha_to_one)
    x_c, noise = randn((1, 1, 8, 8), 1), randn((1, 1, 8, 8), 2)
    inferer = SRDSInferer(scheduler, 7, target="image")
    ab_final = float(scheduler.final_alpha_cumprod)
    expected = noise * math.sqrt(ab_final / float(scheduler.alphas_cumprod.double()[999]))
    torch.testing.assert_close(inferer.sample(x_c, Zero(), x_c, noise), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spatial", [(8, 8), (4, 6, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("kind", ["torch", "metatensor"])
@pytest.mark.parametrize("target", ["image", "residual"])
def test_zero_network_srds_returns_zero_target(scheduler, spatial, kind, target):
    x_c = randn((2, 1, *spatial), 1, torch.float32)
    noisy = x_c + 0.1 * randn(x_c.shape, 2, torch.float32)
    if kind == "metatensor":
        noisy = MetaTensor(noisy, meta={"filename_or_obj": "scan.nii.gz"})
    out = SRDSInferer(scheduler, 5, target=target, residual_scale=0.5)(noisy, Zero(), condition=x_c)
    assert type(out) is type(noisy)
    if kind == "metatensor":
        assert out.meta["filename_or_obj"] == "scan.nii.gz"
    expected = torch.zeros_like(x_c) if target == "image" else x_c
    torch.testing.assert_close(torch.as_tensor(out), expected, rtol=0, atol=1e-6)


# --- the Gaussian oracle -----------------------------------------------------------------------------------


def test_oracle_srds_recovers_mean(scheduler):
    mu = smooth_pattern(batch=4)
    inferer = SRDSInferer(scheduler, 20, target="image")
    out = inferer(mu, Oracle(scheduler), condition=mu)
    assert (out - mu).abs().max() < 0.01  # measured 2.3e-3: the s sqrt(ᾱ_T) |mu| bias, no first-order noise
    torch.testing.assert_close(out, mu * (1 - oracle_gain(scheduler, inferer)), rtol=0, atol=1e-9)


def test_oracle_single_sample_follows_ddim_closed_form(scheduler):
    mu, noise = smooth_pattern(batch=4), randn((4, 1, 16, 16), 3)
    inferer = SRDSInferer(scheduler, 20, target="image")
    gain = oracle_gain(scheduler, inferer)
    out = inferer.sample(mu, Oracle(scheduler), mu, noise)
    ab_t = float(scheduler.alphas_cumprod.double()[999])
    torch.testing.assert_close(out, mu + gain * (noise / math.sqrt(ab_t) - mu), rtol=0, atol=1e-9)


def test_oracle_single_sample_std_approaches_target_std(scheduler):
    # 20 DDIM steps under-disperse (std 0.238 = -21 %, the discretisation of the probability-flow ODE); 200: -2 %.
    mu = smooth_pattern(batch=32)
    inferer = SRDSInferer(scheduler, 200, target="image")
    std = (inferer.sample(mu, Oracle(scheduler), mu, randn(mu.shape, 4)) - mu).std()
    assert abs(std / S - 1) < 0.1


def test_oracle_residual_target(scheduler):
    mu, x_c = smooth_pattern(), randn((2, 1, 16, 16), 5)  # mu (1, 1, 16, 16) broadcasts over the member batch
    noisy = x_c + randn(x_c.shape, 6)  # x' enters only through the start state, unused from pure noise
    inferer = SRDSInferer(scheduler, 20, target="residual", residual_scale=0.5)
    out = inferer(noisy, Oracle(scheduler, mu=mu), condition=x_c)
    assert (out - (x_c + 0.5 * mu)).abs().max() < 0.01


def test_oracle_independent_pairs_are_worse(scheduler):
    mu = smooth_pattern(batch=4)
    sym = SRDSInferer(scheduler, 20, target="image", seed=7)(mu, Oracle(scheduler), condition=mu)
    ind = SRDSInferer(scheduler, 20, target="image", seed=7, symmetric=False)(mu, Oracle(scheduler), condition=mu)
    err_sym, err_ind = (sym - mu).abs().mean(), (ind - mu).abs().mean()
    assert not torch.equal(sym, ind)
    assert err_ind > 0.1  # measured 0.13 = sqrt(2 / pi) * 0.238 / sqrt(2): half the variance of one sample
    assert err_ind > 50 * err_sym  # measured ~190x


def test_oracle_start_timestep_keeps_input(scheduler):
    # From x_t0 = sqrt(ᾱ) x' + sqrt(1 - ᾱ) eps, d = x̄ - mu starts at (x' - mu) + sigma_t0 eps,
    # so SRDS gives mu + G (x' - mu).
    mu = smooth_pattern(batch=2)
    first_inputs = []
    oracle = Oracle(scheduler)

    def network(x, timesteps):
        if not first_inputs:
            first_inputs.append(x)
        return oracle(x, timesteps)

    inferer = SRDSInferer(scheduler, 10, target="image", start_timestep=500)
    noisy = mu + 0.05 * randn(mu.shape, 8)
    out = inferer(noisy, network, condition=mu)
    ab = float(scheduler.alphas_cumprod.double()[500])
    deviation = first_inputs[0][:, :1].reshape(2, *mu.shape) - math.sqrt(ab) * noisy
    torch.testing.assert_close(deviation[0], -deviation[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out, mu + oracle_gain(scheduler, inferer) * (noisy - mu), rtol=0, atol=1e-9)


def test_return_spread(scheduler):
    mu = smooth_pattern(batch=2)
    inferer = SRDSInferer(scheduler, 10, target="image", return_spread=True, num_pairs=1)
    mean, spread = inferer(mu, Oracle(scheduler), condition=mu)
    assert spread.shape == mu.shape and torch.isfinite(spread).all() and (spread >= 0).all()
    assert spread.mean() > 0
    # K = 1: spread = |a - b| / 2 of the eps and -eps samples (eps: the float32 draw of a CPU generator seeded with
    # `seed`, as the inferer makes it).
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32).double()
    a, b = (inferer.sample(mu, Oracle(scheduler), mu, n) for n in (eps, -eps))
    torch.testing.assert_close(spread, (a - b).abs() / 2)
    torch.testing.assert_close(mean, (a + b) / 2)


# --- batching, seeding, devices ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_pairs", [1, 4])
def test_members_in_one_batch_and_exact_negatives(scheduler, num_pairs):
    spy, batch = Spy(), 2
    x_c = randn((batch, 1, 8, 8), 1, torch.float32)
    SRDSInferer(scheduler, 6, num_pairs=num_pairs)(x_c + 0.1, spy, condition=x_c)
    assert len(spy.inputs) == 6
    assert all(x.shape == (2 * num_pairs * batch, 2, 8, 8) for x in spy.inputs)
    members = spy.inputs[0].reshape(2 * num_pairs, batch, 2, 8, 8)
    assert torch.equal(members[:num_pairs, :, 0], -members[num_pairs:, :, 0])  # eps_k and -eps_k
    assert torch.equal(members[:, :, 1:], x_c.expand(2 * num_pairs, -1, -1, -1, -1))  # condition repeated
    eps = members[:num_pairs, :, 0].flatten(0, 1)
    assert not torch.equal(eps[0], eps[1])  # each batch item (and pair) draws its own eps


def test_seed_determinism(scheduler):
    x_c = randn((2, 1, 8, 8), 1, torch.float32)

    def run(seed):
        return SRDSInferer(scheduler, 5, seed=seed)(x_c + 0.1, Spy(), condition=x_c)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_golden_values(scheduler):
    # Seeded 10-step run on the oracle: the mean is noise-free, the spread guards the noise draw and the loop.
    mu = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    inferer = SRDSInferer(scheduler, 10, num_pairs=2, seed=0, target="image", return_spread=True)
    mean, spread = inferer(mu, Oracle(scheduler), condition=mu)
    torch.testing.assert_close(mean[0, 0, 0], torch.tensor(GOLDEN_MEAN), rtol=0, atol=1e-5)
    torch.testing.assert_close(spread[0, 0, 0], torch.tensor(GOLDEN_SPREAD), rtol=0, atol=1e-4)


GOLDEN_MEAN = [-0.998852, -0.865672, -0.732492, -0.599311]  # mu (1 - G), G = 1.15e-3
GOLDEN_SPREAD = [0.22485, 0.26197, 0.07916, 0.11555]


def test_inference_mode_and_callback(scheduler):
    steps = []
    inferer = SRDSInferer(scheduler, 4, callback=steps.append)
    x_c = randn((1, 1, 8, 8), 1, torch.float32)
    with torch.inference_mode():
        out = inferer(x_c, Spy(), condition=x_c)
    assert out.shape == x_c.shape
    assert [s["timestep"] for s in steps] == inferer.timesteps.tolist()
    assert steps[-1]["step"] == 3 and steps[-1]["sample"].shape == (2, 1, 8, 8)


def test_progress_bar_on_stderr_only(scheduler, capsys):
    x_c = randn((1, 1, 8, 8), 1, torch.float32)
    SRDSInferer(scheduler, 3, progress=True)(x_c, Spy(), condition=x_c)
    captured = capsys.readouterr()
    assert captured.out == "" and "SRDS" in captured.err


def test_condition_fn(scheduler):
    x = randn((1, 1, 8, 8), 1, torch.float32)
    with_fn = SRDSInferer(scheduler, 3, condition_fn=lambda t: 0.5 * t)(x, Spy())
    torch.testing.assert_close(with_fn, SRDSInferer(scheduler, 3)(x, Spy(), condition=0.5 * x))
    with pytest.raises(ValueError, match="condition_fn"):
        SRDSInferer(scheduler, 3)(x, Spy())


def test_never_clamps_unless_asked():
    scheduler = DDIMScheduler()  # clip_sample=True by default: ignored, data need not lie in [-1, 1]
    mu = 3 * smooth_pattern()
    out = SRDSInferer(scheduler, 10, target="image")(mu, Oracle(scheduler), condition=mu)
    assert (out - mu).abs().max() < 0.05
    seen = []
    clipped = SRDSInferer(scheduler, 10, target="image", clip_x0=(-1, 1), callback=seen.append)
    assert clipped(mu, Oracle(scheduler), condition=mu).max() <= 1 + 1e-6
    assert all(s["pred_original_sample"].abs().max() <= 1 for s in seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(scheduler):
    mu = smooth_pattern(batch=2).float()
    inferer = SRDSInferer(scheduler, 10, target="image", symmetric=False)
    cpu = inferer(mu, Oracle(scheduler), condition=mu)
    gpu = inferer(mu.cuda(), Oracle(scheduler), condition=mu.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_monai_diffusion_unet_signature(scheduler):
    nets = pytest.importorskip("monai.networks.nets")
    pytest.importorskip("einops")  # DiffusionModelUNet's attention blocks need it
    net = nets.DiffusionModelUNet(
        spatial_dims=2, in_channels=2, out_channels=1, channels=(8, 8), attention_levels=(False, False),
        num_res_blocks=1, norm_num_groups=8,
    ).eval()
    x_c = randn((1, 1, 16, 16), 1, torch.float32)
    assert SRDSInferer(scheduler, 2)(x_c, net, condition=x_c).shape == x_c.shape


def test_pad_multiple_fits_a_unet_to_odd_sizes_and_is_a_no_op_on_multiples(scheduler):
    """A 3-level U-Net fails on 18 x 15 unless padded; on a multiple of 4 padding changes nothing."""
    nets = pytest.importorskip("monai.networks.nets")
    pytest.importorskip("einops")
    torch.manual_seed(0)
    net = nets.DiffusionModelUNet(
        spatial_dims=2, in_channels=2, out_channels=1, channels=(8, 8, 8), attention_levels=(False,) * 3,
        num_res_blocks=1, norm_num_groups=8,
    ).eval()
    odd = randn((1, 1, 18, 15), 2, torch.float32)
    with pytest.raises(RuntimeError):
        SRDSInferer(scheduler, 2)(odd, net, condition=odd)
    assert SRDSInferer(scheduler, 2, pad_multiple=4)(odd, net, condition=odd).shape == odd.shape
    even = randn((1, 1, 16, 12), 3, torch.float32)
    assert torch.equal(SRDSInferer(scheduler, 2, pad_multiple=4)(even, net, condition=even),
                       SRDSInferer(scheduler, 2)(even, net, condition=even))


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": "noise"}, r"target='noise'.*\['residual', 'image'\]"),
        ({"num_inference_steps": 0}, r"num_inference_steps=0 is outside \[1, 1000\]"),
        ({"num_inference_steps": 1001}, r"num_inference_steps=1001"),
        ({"start_timestep": -1}, r"start_timestep=-1 is outside \[0, 999\]"),
        ({"start_timestep": 1000}, r"start_timestep=1000"),
        ({"num_pairs": 0}, "num_pairs"),
        ({"residual_scale": 0.0}, "residual_scale"),
        ({"clip_x0": (1.0, -1.0)}, "clip_x0"),
        ({"condition_fn": "bsn"}, "condition_fn"),
        ({"pad_multiple": 0}, "pad_multiple"),
    ],
)
def test_invalid_arguments(scheduler, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SRDSInferer(scheduler, **kwargs)


def test_rejects_non_epsilon_scheduler():
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        SRDSInferer(DDIMScheduler(prediction_type="v_prediction"))


def test_warns_and_dedupes_when_steps_exceed_start(scheduler):
    with pytest.warns(UserWarning, match=r"num_inference_steps=20 > start_timestep \+ 1 = 6"):
        inferer = SRDSInferer(scheduler, 20, start_timestep=5)
    assert inferer.timesteps.tolist() == [5, 4, 3, 2, 1, 0] and inferer.num_inference_steps == 6


def test_shape_mismatch(scheduler):
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"condition has shape \(1, 1, 4, 4\)"):
        SRDSInferer(scheduler, 2)(x, Spy(), condition=torch.zeros(1, 1, 4, 4))
