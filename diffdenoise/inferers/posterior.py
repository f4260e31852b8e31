"""Posterior re-injection: give back the pixel a blind-spot network never sees.

A blind-spot estimate mu(p) predicts pixel p from its neighbours only, so it throws away the noisy
value y(p), which is the best single clue to x(p) wherever the image has detail finer than the blind
spot. With the noise model known, the two combine as in Laine et al., "High-quality self-supervised
deep image denoising" (NeurIPS 2019): take the blind-spot prior x ~ N(mu, v) and the likelihood
y ~ N(x, s^2), then

    E[x | y] = mu + v / (v + s^2) * (y - mu).

s^2 comes from the noise model at the estimate (``diffdenoise.noise.noise_variance``). v, the prior's
spread, comes from one of two priors:

- ``box`` (the heuristic): read from the data: E[(y - mu)^2] = v + s^2 (the noise is independent of its
  neighbours), so a box mean of (y - mu)^2 over a small window, minus s^2, gives a local v. Flat regions
  get v ~ 0 and keep mu; edges and texture get v >> s^2 and keep y. Unknown Gaussian sigma is estimated
  per image from its wavelet detail coefficients (skimage's ``estimate_sigma``, Donoho's MAD rule);
  Poisson and Gamma need their level.
- ``learned`` (Laine et al. in full): the network predicts v itself (``BlindSpotNet.prior``, trained by
  ``diffdenoise.prior_likelihood.PriorLikelihoodLoss``), and an unknown level is the one it learned.
  Poisson and Gamma use the same Gaussian form with s^2 evaluated at mu (the loss's approximation).

Either way the posterior std is sqrt(v s^2 / (v + s^2)), the uncertainty left after seeing y.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from skimage.restoration import estimate_sigma

from diffdenoise.noise import NOISE_MODELS, noise_variance
from diffdenoise.prior_likelihood import prior_noise_variance

__all__ = ["PosteriorReinjection"]

_ESTIMABLE = ("gaussian", "rician")
PRIORS = ("box", "learned")


def _box_mean(t: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a window x window square; the border is replicated, so edge pixels are not diluted by zeros."""
    pad = window // 2
    return F.avg_pool2d(F.pad(t, (pad,) * 4, mode="replicate"), window, stride=1)


class PosteriorReinjection(Inferer):
    """Wraps a blind-spot inferer: its estimate, combined with the noisy input by the local posterior mean.

    Args:
        blind_inferer: gives the blind-spot estimate as ``blind_inferer(inputs, network)``, e.g. a
            ``BlindSpotInferer`` (whose output alone is the diffusion condition x_c).
        noise: the noise model of the data, one of ``diffdenoise.noise.NOISE_MODELS``.
        level: the model's level (sigma | lambda | alpha, as ``SyntheticNoise``); None estimates a
            Gaussian/Rician sigma from each image (box prior) or takes the network's learned level.
        window: side of the square window (pixels, odd) over which the box prior's spread v is averaged.
        gamma_rate: Gamma rate beta; None means beta = alpha.
        prior: where the prior variance v comes from: ``box`` (the local box mean above) or ``learned``
            (``network.prior``, a ``BlindSpotNet`` with ``prior_variance=True``; ``level=None`` then uses
            its learned level, for any model). ``learned`` runs the network at the blind inferer's
            ``pd_stride`` and skips its refinement, which is not blind.

    Raises:
        ValueError: an unknown model or prior, a window that is not an odd integer >= 1, or, with the box
            prior, ``level=None`` with a model whose level cannot be estimated.

    Example::

        import torch
        from diffdenoise.inferers import BlindSpotInferer, PosteriorReinjection
        from diffdenoise.networks import BlindSpotNet

        net = BlindSpotNet(features=16, num_blocks=2).eval()
        denoiser = PosteriorReinjection(BlindSpotInferer(), "gaussian", level=6 / 255)
        x_hat = denoiser(torch.rand(1, 1, 64, 64), net)

        # the learned prior (train it with diffdenoise.prior_likelihood.PriorLikelihoodLoss), learned level
        net = BlindSpotNet(features=16, num_blocks=2, prior_variance=True).eval()
        denoiser = PosteriorReinjection(BlindSpotInferer(), "poisson", level=None, prior="learned")
        x_hat, x_std = denoiser.posterior(torch.rand(1, 1, 64, 64), net)
    """

    def __init__(self, blind_inferer: Callable[..., torch.Tensor], noise: str = "gaussian", level: float | None = None,
                 window: int = 9, gamma_rate: float | None = None, prior: str = "box"):
        super().__init__()
        if noise not in NOISE_MODELS:
            raise ValueError(f"noise {noise!r} is not one of {', '.join(NOISE_MODELS)}. Set `noise` to the data's model.")
        if prior not in PRIORS:
            raise ValueError(f"prior {prior!r} is not one of {', '.join(PRIORS)}. Set `prior` (bundle: bsn_prior).")
        if level is None and noise not in _ESTIMABLE and prior == "box":
            raise ValueError(
                f"level=None estimates a Gaussian sigma, but noise {noise!r} needs its level. "
                "Set `level` (lambda for poisson, alpha for gamma)."
            )
        if level is not None:
            noise_variance(noise, level, 0.0, gamma_rate)  # validates level and gamma_rate
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"window must be an odd integer >= 1, got {window!r}. Set `window` to e.g. 9.")
        self.blind_inferer = blind_inferer
        self.noise = noise
        self.level = level
        self.window = window
        self.gamma_rate = gamma_rate
        self.prior = prior

    def noise_variance(self, estimate: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """s^2 per pixel, from the model at the estimate, or from a per-image sigma estimate."""
        if self.level is not None:
            return noise_variance(self.noise, self.level, estimate, self.gamma_rate)
        sigmas = [estimate_sigma(image.float().cpu().numpy(), channel_axis=0, average_sigmas=True) for image in noisy]
        sigma = torch.tensor(sigmas, dtype=estimate.dtype, device=estimate.device).view(-1, 1, 1, 1)
        return sigma.square().expand_as(estimate)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        """Denoises (B, C, H, W) ``inputs``: E[x | y] under the box or the learned prior."""
        if self.prior == "box":
            return self.combine(self.blind_inferer(inputs, network, *args, **kwargs), inputs)
        return self.posterior(inputs, network, *args, **kwargs)[0]

    def posterior(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        """(E[x | y], posterior std sqrt(v s^2 / (v + s^2))), each (B, C, H, W), for (B, C, H, W) ``inputs``."""
        if self.prior == "box":
            return self._box_posterior(self.blind_inferer(inputs, network, *args, **kwargs), inputs)
        mu, v, s2 = self._learned_prior(inputs, network, *args, **kwargs)
        return (v * inputs + s2 * mu) / (v + s2), (v * s2 / (v + s2)).sqrt()

    def _learned_prior(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any):
        """mu, v from ``network.prior`` and s^2 at mu, with gradients only while the network trains."""
        training = bool(getattr(network, "training", False))
        with torch.set_grad_enabled(training and torch.is_grad_enabled()):
            mu, v = network.prior(inputs, *args, pd_stride=getattr(self.blind_inferer, "pd_stride", None), **kwargs)
            s2 = prior_noise_variance(self.noise, self.level, mu, getattr(network, "noise_log_scale", None),
                                      self.gamma_rate)
        return mu, v, s2

    def combine(self, estimate: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """E[x | y] under the box prior for (B, C, H, W) ``estimate`` (blind-spot mu) and ``noisy`` (y)."""
        return self._box_posterior(estimate, noisy)[0]

    def _box_posterior(self, estimate: torch.Tensor, noisy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the posterior, with v a local mean of (y - mu)^2 - s^2 clamped at 0."""
        if estimate.shape != noisy.shape:
            raise ValueError(f"estimate {tuple(estimate.shape)} and noisy {tuple(noisy.shape)} must have one shape")
        s2 = self.noise_variance(estimate, noisy)
        residual = noisy - estimate
        prior = (_box_mean(residual.square(), self.window) - _box_mean(s2, self.window)).clamp(min=0.0)
        total = (prior + s2).clamp(min=torch.finfo(estimate.dtype).tiny)
        return estimate + prior / total * residual, (prior * s2 / total).sqrt()
