"""The likelihood of a noisy pixel under a blind-spot prior: stage 1's loss when the net predicts its own prior.

Laine et al., "High-quality self-supervised deep image denoising" (NeurIPS 2019): the blind-spot net
predicts a Gaussian prior x ~ N(mu, v) of each pixel from its neighbours; with the noise y = x + n,
n ~ N(0, s^2) independent of them, the pixel's own noisy value is distributed as y ~ N(mu, v + s^2), and
its negative log-likelihood trains mu and v from noisy images alone (mu as the MSE loss would, v to the
spread that mu leaves).

s^2 per noise model, at the prior mean (the clean x is unknown): Gaussian sigma^2; Poisson mu / lambda;
Gamma mu^2 alpha / beta^2 (mu^2 / alpha with beta = alpha); Rician as Gaussian, sigma^2, its high-SNR limit
(its bias near zero signal is not modelled). Poisson and Gamma are thus approximated by a Gaussian of
their variance.

An unknown level is a scalar c (``BlindSpotNet.noise_log_scale``, in the checkpoint) with s^2 = exp(c) g(mu),
g = 1, mu, mu^2 as above, so the level is sigma = exp(c / 2), lambda = exp(-c) or alpha = exp(-c). It starts at
the patch-PCA estimate of the training slices (``diffdenoise.noise_level``, the estimate the leak-free stage and
the no-reference estimates use; ``initial_noise_level``). Gaussian and Rician levels are then learned with the
network. Poisson and Gamma levels stay at that estimate: their noise vanishes with the signal, so no region is
noise alone, and wherever the prior mean errs a larger s^2 and a smaller v fit y equally well. Measured on a
studyforrest slice (Poisson lambda 200, 1000 steps of a 16-feature BSN): learned, the level drifted to lambda
80-90 (twice the noise) and the posterior gained nothing over the noisy input (30.72 vs 30.68 dB); at 10x the
learning rate it swung between 15 and 485. A Gaussian level is pinned where the prior is sure (the background):
6.08/255 for 6/255 (``tests/test_prior_likelihood.py``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from diffdenoise.noise import NOISE_MODELS, noise_variance

__all__ = ["LEARNED_LEVEL_MODELS", "PriorLikelihoodLoss", "initial_noise_level", "learned_noise_level",
           "level_from_log_scale", "log_scale_from_level", "prior_noise_variance"]

# the models whose unknown level the likelihood learns; the others keep their patch-PCA estimate (module docstring)
LEARNED_LEVEL_MODELS = ("gaussian", "rician")

# The total variance never drops below this (std 0.003, 0.8 grey levels at 8 bits). Poisson background has
# x = 0, so y = 0 and s^2 = 0 there; the likelihood then drives v + s^2 to the floor, and its weight
# 1 / (v + s^2) on those pixels dwarfs the rest: at 1e-6, training on a Poisson MRI slice was unstable.
VARIANCE_FLOOR = 1e-5
# Laine et al.'s "balance regularization" (their code): with the level unknown, the loss gains -0.1 s per
# pixel. The likelihood cannot tell an s^2 set too low from a v raised by the difference; the term breaks
# that tie towards the noise. Its bias on s is ~0.025 s / (the image's flat fraction): well under 1%.
BALANCE = 0.1


def prior_noise_variance(noise: str, level: float | None, mu: torch.Tensor, noise_log_scale: torch.Tensor | None = None,
                         gamma_rate: float | None = None) -> torch.Tensor:
    """s^2 per pixel at the prior mean ``mu``: from the noise model's ``level``, or, with ``level=None``,
    from the learned ``noise_log_scale`` c as exp(c) g(mu).

    Raises:
        ValueError: an unknown model, or ``level=None`` without ``noise_log_scale``.
    """
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise {noise!r} is not one of {', '.join(NOISE_MODELS)}. Set `noise` to the data's model.")
    if level is not None:
        return noise_variance(noise, level, mu, gamma_rate)
    if noise_log_scale is None:
        raise ValueError("level=None learns the noise level, which needs `noise_log_scale` (BlindSpotNet with "
                         "prior_variance=True); or set `level`.")
    scale = noise_log_scale.exp()
    if noise == "poisson":
        return scale * mu.clamp(min=0.0)
    if noise == "gamma":
        return scale * mu.square()
    return scale.expand_as(mu)


def learned_noise_level(network: nn.Module, noise: str) -> float:
    """The level a prior-variance BSN learned, in ``SyntheticNoise`` units: sigma | lambda | alpha (beta = alpha).

    Raises:
        ValueError: an unknown model, or a network without ``noise_log_scale``.
    """
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise {noise!r} is not one of {', '.join(NOISE_MODELS)}. Set `noise` to the data's model.")
    log_scale = getattr(network, "noise_log_scale", None)
    if log_scale is None:
        raise ValueError("the network has no learned noise level; build it with `prior_variance=True`.")
    return level_from_log_scale(float(log_scale.detach()), noise)


def level_from_log_scale(c: float, noise: str) -> float:
    """The level that s^2 = exp(c) g(mu) stands for: sigma = exp(c / 2), or lambda | alpha = exp(-c); for a
    checkpoint's ``noise_log_scale`` without building its network."""
    return math.exp(-c) if noise in ("poisson", "gamma") else math.exp(c / 2)


def log_scale_from_level(level: float, noise: str) -> float:
    """c with s^2 = exp(c) g(mu) for a level: the inverse of ``level_from_log_scale``."""
    return -math.log(level) if noise in ("poisson", "gamma") else 2 * math.log(level)


def initial_noise_level(network: nn.Module, noise: str, level: float | None, estimate: Callable[[], float]) -> None:
    """Before training with the level unknown: the network's ``noise_log_scale`` set to ``estimate()`` (the bundle
    passes the patch-PCA estimate of the training slices), learned on from there (``LEARNED_LEVEL_MODELS``) or
    frozen at it (the others). Trained at the network's learning rate: from that start the level has little way
    to go, and a faster rate made it swing.

    Nothing happens (``estimate`` is not called) with a known ``level`` or a network without a learned level (the
    box prior).

    Raises:
        ValueError: ``estimate`` has none for this model (correlated Poisson or Gamma): set ``noise_level``.
    """
    log_scale = getattr(network, "noise_log_scale", None)
    if level is not None or log_scale is None:
        return
    try:
        start = estimate()
    except ValueError as exc:
        raise ValueError(f"stage 1 cannot start its noise level: {exc}. Set `noise_level` (fit --noise_level).") from exc
    with torch.no_grad():
        log_scale.fill_(log_scale_from_level(start, noise))
    log_scale.requires_grad_(noise in LEARNED_LEVEL_MODELS)


class PriorLikelihoodLoss(nn.Module):
    """Mean negative log-likelihood of the noisy pixels y under N(mu, v + s^2), constants dropped.

    Args:
        noise: the data's noise model, one of ``diffdenoise.noise.NOISE_MODELS``.
        level: sigma | lambda | alpha (as ``SyntheticNoise``); None learns it through ``noise_log_scale``.
        noise_log_scale: the network's learned c (``BlindSpotNet.noise_log_scale``); used when ``level`` is None.
        gamma_rate: Gamma rate beta with a known level; None means beta = alpha.
        beta: each pixel's term weighted by its total variance ** beta, held constant (beta-NLL, Seitzer et al.,
            ICLR 2022). The plain likelihood (0) divides the mean's error by the variance, so the mean learns
            little where the prior is unsure (edges, texture); at 1 the mean's gradient is MSE's and v still
            goes to its likelihood optimum.

    Raises:
        ValueError: an unknown model, a level out of range, or ``level=None`` without ``noise_log_scale``.

    Example::

        import torch
        from diffdenoise.inferers import PriorInferer
        from diffdenoise.networks import BlindSpotNet
        from diffdenoise.prior_likelihood import PriorLikelihoodLoss

        net = BlindSpotNet(features=16, num_blocks=2, prior_variance=True)
        loss_fn = PriorLikelihoodLoss("gaussian", None, net.noise_log_scale)   # learns sigma
        noisy = torch.rand(4, 1, 48, 48)
        loss = loss_fn(PriorInferer()(noisy, net), noisy)
    """

    def __init__(self, noise: str = "gaussian", level: float | None = None,
                 noise_log_scale: torch.Tensor | None = None, gamma_rate: float | None = None, beta: float = 0.0):
        super().__init__()
        prior_noise_variance(noise, level, torch.zeros(1), noise_log_scale, gamma_rate)  # validates
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta {beta!r} must be in [0, 1] (0: the plain likelihood, 1: the mean learns as with MSE)")
        self.beta = beta
        self.noise = noise
        self.level = level
        self.noise_log_scale = noise_log_scale
        self.gamma_rate = gamma_rate

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``pred`` = cat([mu, v], dim=1) with 2C channels (``PriorInferer``), ``label`` = y with C channels."""
        if pred.shape[1] != 2 * label.shape[1] or pred.shape[2:] != label.shape[2:]:
            raise ValueError(f"pred {tuple(pred.shape)} must be cat([mu, v], dim=1) for label {tuple(label.shape)}; "
                             "train with the PriorInferer and a BlindSpotNet with prior_variance=True")
        mu, v = pred.chunk(2, dim=1)
        # s^2 at mu stands in for s^2 at the unknown x: mu gets no gradient through it, so it stays the prior's
        # mean instead of moving to where the noise model predicts less noise
        s2 = prior_noise_variance(self.noise, self.level, mu.detach(), self.noise_log_scale, self.gamma_rate)
        total = (v + s2).clamp(min=VARIANCE_FLOOR)
        nll = total.log() + (label - mu).square() / total
        if self.level is None:
            nll = nll - BALANCE * s2.clamp(min=VARIANCE_FLOOR).sqrt()
        if self.beta:
            nll = nll * total.detach() ** self.beta
        return 0.5 * nll.mean()
