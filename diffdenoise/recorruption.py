"""Recorruption: split one noisy image into a noisier input and a target whose noise is independent of it.

Why (docs/results.md, issue 16): a network trained to output the noisy image y from anything that depends on
y's own noise learns to copy that noise. Recorrupted-to-Recorrupted (R2R, Pang et al., CVPR 2021), its
exponential-family form (GR2R, Monroy et al., CVPR 2025) and ambient diffusion (Daras et al., ICML 2024)
split y into an input z and a target y~ such that, given the clean x, the noise of y~ is independent of z
and has mean zero. Then E[y~ | z] = E[x | z]: a network trained to map z to y~ with a squared loss is the
MMSE denoiser of z, exactly as if trained on clean targets.

Units. Images are in [0, 1] (``diffdenoise prepare``). ``rho`` is the recorruption strength: the added noise
std relative to the data's noise std, s = rho * sigma. In the diffusion form (``diffdenoise.diffusion``)
rho is the schedule's s_t = sqrt((1 - abar_t) / abar_t) of the image measured in units of sigma_ref
(``y / sigma_ref``), so the band of timesteps trained on is the same for any noise level; had the images
been mapped to [-1, 1], sigma would double and the same rho would mean the same timesteps.

The splits, for x the clean image, one draw per pixel (``state``), ``antithetic(state)`` its mirror:

- Gaussian, y = x + n, n ~ N(0, sigma^2 C) (C = I for i.i.d. noise, or the correlation of
  ``diffdenoise.noise``'s coloured model, unit diagonal): eps ~ N(0, C),
  z = y + rho sigma eps, y~ = y - (sigma / rho) eps. Cov(n + s eps, n - (sigma^2 / s) eps) =
  sigma^2 C - sigma^2 C = 0, and both are Gaussian, so they are independent for any known C. Mirror: -eps.
  Rician (MRI magnitude) is treated as Gaussian with its sigma: exact only where the signal is well above
  sigma (its bias in dark background is not removed).
- Poisson, y = K / lambda, K ~ Poisson(lambda x): binomial thinning, K1 ~ Binomial(K, p),
  p = 1 / (1 + rho^2). Then K1 ~ Poisson(p lambda x) and K - K1 ~ Poisson((1 - p) lambda x), independent:
  z = K1 / (p lambda), y~ = (K - K1) / ((1 - p) lambda). z has the variance (1 + rho^2) x / lambda.
  K1 is drawn by inverting its CDF at a uniform u; the mirror is 1 - u.
- Gamma, y = x G / alpha, G ~ Gamma(alpha, 1) (rate = alpha, mean 1): Beta split, B ~ Beta(a, alpha - a),
  a = alpha / (1 + rho^2). G B ~ Gamma(a) and G (1 - B) ~ Gamma(alpha - a), independent:
  z = y B alpha / a, y~ = y (1 - B) alpha / (alpha - a). B is drawn by inverting its CDF; mirror 1 - u.

Correlated Poisson or Gamma noise (``diffdenoise.noise``'s blurred mix) is neither Poisson nor Gamma, so no
exact split exists: those raise. ``sigma_ref`` is the noise std at a mid-grey signal of 0.5 (sigma itself for
Gaussian noise): a fixed scale for the network's input and output, not a statistic of the data.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta as beta_dist
from scipy.stats import binom

from diffdenoise.noise import NOISE_MODELS

__all__ = ["Recorruption", "GaussianRecorruption", "PoissonRecorruption", "GammaRecorruption",
           "make_recorruption", "schedule_rho", "band_timesteps", "timestep_for_rho", "gaussian_kernel1d"]

_REFERENCE_SIGNAL = 0.5


class Recorruption:
    """One noise model's split of y into (z, y~); subclasses hold the formulas of the module docstring.

    Args:
        level: sigma (Gaussian), lambda (Poisson) or alpha (Gamma), as ``diffdenoise.noise.SyntheticNoise``.
    """

    sigma_ref: float

    def __init__(self, level: float):
        if not level > 0:
            raise ValueError(f"the noise level must be > 0 for a recorrupted target, got {level}; set `noise_level`")
        self.level = float(level)

    def draw(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The random state of one split of ``y`` (B, C, H, W): one value per pixel (Gaussian: eps; else a uniform)."""
        u = torch.rand(y.shape, generator=generator, dtype=torch.float64, device="cpu")
        return u.to(y.device)

    def antithetic(self, state: torch.Tensor) -> torch.Tensor:
        """The mirrored state: the split it gives is as likely and cancels the first-order term of the first."""
        return 1.0 - state

    def split(self, y: torch.Tensor, state: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, y~)`` for the noisy ``y`` (B, C, H, W), a state from ``draw`` and ``rho`` (B,) > 0."""
        raise NotImplementedError

    def target_noise_variance(self, y: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """E[(y~ - x)^2] per pixel, estimated from y: what the loss holds beyond the MSE of the network's output."""
        raise NotImplementedError


def _per_item(rho: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """rho (B,) as (B, 1, ..., 1) in the dtype of ``like``."""
    return torch.as_tensor(rho, dtype=like.dtype, device=like.device).reshape(-1, *[1] * (like.ndim - 1))


def gaussian_kernel1d(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian of ``scipy.ndimage.gaussian_filter`` (truncate 4), which makes the noise."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


class GaussianRecorruption(Recorruption):
    """z = y + rho sigma eps, y~ = y - (sigma / rho) eps, with eps coloured like the data's noise.

    Args:
        level: sigma, the marginal noise std in [0, 1] image units.
        correlation_sigma: std (pixels) of the Gaussian kernel of ``diffdenoise.noise``'s correlated model;
            0 for i.i.d. noise. eps is then (g blur(w1) + w2) / sqrt(2) with white w1, w2 and g the kernel's
            power gain, the model's covariance with unit diagonal.
    """

    def __init__(self, level: float, correlation_sigma: float = 0.0):
        super().__init__(level)
        if not correlation_sigma >= 0:
            raise ValueError(f"correlation_sigma must be >= 0 (pixels), got {correlation_sigma}")
        self.sigma_ref = self.level
        self.correlation_sigma = float(correlation_sigma)
        self._kernel = None
        if self.correlation_sigma > 0:
            kernel = gaussian_kernel1d(self.correlation_sigma)
            self._kernel = torch.as_tensor(kernel, dtype=torch.float32)
            self._gain = 1.0 / float((kernel**2).sum())  # 1 / sqrt(sum of squared 2-D weights) = 1 / sum k^2

    def draw(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = (2, *y.shape) if self._kernel is not None else y.shape
        white = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu").to(y.device)
        return white if self._kernel is None else (self._blur(white[0]) * self._gain + white[1]) / math.sqrt(2.0)

    def _blur(self, w: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur over H and W with reflected borders, per channel."""
        k = self._kernel.to(w.device)
        r = len(k) // 2
        b, c, h, width = w.shape
        w = w.reshape(b * c, 1, h, width)
        w = F.conv2d(F.pad(w, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        w = F.conv2d(F.pad(w, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
        return w.reshape(b, c, h, width)

    def antithetic(self, state: torch.Tensor) -> torch.Tensor:
        return -state

    def split(self, y, state, rho):
        rho = _per_item(rho, y)
        eps = state.to(y.dtype)
        return y + rho * self.level * eps, y - (self.level / rho) * eps

    def target_noise_variance(self, y, rho):
        rho = _per_item(rho, y)
        return torch.ones_like(y) * self.level**2 * (1.0 + 1.0 / rho**2)


class PoissonRecorruption(Recorruption):
    """Binomial thinning of the counts K = lambda y (rounded: real data need not hold whole counts).

    Args:
        level: lambda, counts per unit intensity.
    """

    def __init__(self, level: float):
        super().__init__(level)
        self.sigma_ref = math.sqrt(_REFERENCE_SIGNAL / self.level)

    def split(self, y, state, rho):
        p = 1.0 / (1.0 + _per_item(rho, y).double() ** 2)
        counts = torch.round(self.level * y.double().clamp(min=0))
        u = state.double().clamp(1e-12, 1 - 1e-12)
        kept = binom.ppf(u.cpu().numpy(), counts.cpu().numpy(), p.expand_as(u).cpu().numpy())
        kept = torch.as_tensor(kept, device=y.device).clamp(min=0).minimum(counts)
        z, target = kept / (p * self.level), (counts - kept) / ((1 - p) * self.level)
        return z.to(y.dtype), target.to(y.dtype)

    def target_noise_variance(self, y, rho):
        rho = _per_item(rho, y)
        return y.clamp(min=0) * (1.0 + rho**2) / (rho**2 * self.level)


class GammaRecorruption(Recorruption):
    """Beta split of multiplicative Gamma noise with mean 1 (shape = rate = alpha).

    Args:
        level: alpha.
    """

    def __init__(self, level: float):
        super().__init__(level)
        self.sigma_ref = _REFERENCE_SIGNAL / math.sqrt(self.level)

    def split(self, y, state, rho):
        a = self.level / (1.0 + _per_item(rho, y).double() ** 2)
        u = state.double().clamp(1e-12, 1 - 1e-12)
        b = beta_dist.ppf(u.cpu().numpy(), a.expand_as(u).cpu().numpy(), (self.level - a).expand_as(u).cpu().numpy())
        b = torch.as_tensor(b, device=y.device)
        yd = y.double()
        z, target = yd * b * self.level / a, yd * (1 - b) * self.level / (self.level - a)
        return z.to(y.dtype), target.to(y.dtype)

    def target_noise_variance(self, y, rho):
        rho = _per_item(rho, y)
        return y**2 / (1.0 + 1.0 / self.level) * (1.0 + rho**2) / (rho**2 * self.level)


def make_recorruption(model: str, level: float, correlation_sigma: float = 0.0) -> Recorruption:
    """The split for a noise model of ``diffdenoise.noise`` (``noise_model``, ``noise_level`` in the bundle).

    Raises:
        ValueError: an unknown model, a missing level, or correlated Poisson/Gamma noise (no exact split).
    """
    if model not in NOISE_MODELS:
        raise ValueError(f"noise_model {model!r} is not one of {', '.join(NOISE_MODELS)}")
    if level is None:
        raise ValueError(f"the leak-free target needs the noise level of {model!r} noise: set `noise_level` "
                         "(or leave it null with Gaussian noise, which `diffdenoise fit` estimates)")
    if model in ("gaussian", "rician"):
        return GaussianRecorruption(level, correlation_sigma)
    if correlation_sigma > 0:
        raise ValueError(f"correlated {model} noise has no exact recorruption (it is no longer {model}); use "
                         "the paper path (--method paper) or stage 1 (--mode bsn) for it")
    return PoissonRecorruption(level) if model == "poisson" else GammaRecorruption(level)


def schedule_rho(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """s_t = sqrt((1 - abar_t) / abar_t) for every timestep: the rho each timestep stands for (float64)."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    return ((1.0 - abar) / abar).sqrt()


def band_timesteps(alphas_cumprod: torch.Tensor, band) -> torch.Tensor:
    """The timesteps whose rho lies in ``band`` = (low, high): the ones a recorrupted training draws from.

    Raises:
        ValueError: the band is not 0 < low <= high, or no timestep of the schedule falls in it.
    """
    low, high = (float(b) for b in band)
    if not 0 < low <= high:
        raise ValueError(f"recorruption_band {list(band)} must be [low, high] with 0 < low <= high, e.g. [0.25, 1.5]")
    rho = schedule_rho(alphas_cumprod)
    timesteps = torch.nonzero((rho >= low) & (rho <= high)).flatten()
    if len(timesteps) == 0:
        raise ValueError(f"no timestep of the noise schedule has rho in recorruption_band {list(band)} "
                         f"(the schedule spans {float(rho.min()):.3g}..{float(rho.max()):.3g}); widen the band")
    return timesteps


def timestep_for_rho(alphas_cumprod: torch.Tensor, rho: float) -> int:
    """The timestep whose rho is nearest to ``rho``."""
    return int(torch.argmin((schedule_rho(alphas_cumprod) - float(rho)).abs()))
