"""No-reference estimates of a denoiser's error: how much it helped, measured on the noisy images alone.

Users have no clean scans, so the mean squared error E||f(y) - x||^2 / N of a denoiser f cannot be computed;
for the noise models of ``diffdenoise.noise`` it can be estimated without bias (or to first order) from y:

    MSE ~= mean((f(y) - y)^2) - mean(v) + 2 mean(w * (f(y + d) - f(y)))

- ``v`` is an unbiased estimate of each pixel's noise variance, so mean(v) is what the first term holds beyond
  the error when f is the identity;
- the last term is the (weighted) divergence of f: a Monte-Carlo probe d with weights w such that
  E[w_i d_j] is the noise covariance Cov(n_i, n_j) (Ramani et al., IEEE TIP 2008). Unlike the exact
  formulas it needs two evaluations of f per image, not one per pixel.

Per noise model (levels as in ``diffdenoise.noise.SyntheticNoise``, images in [0, 1]):

- Gaussian, sigma, i.i.d.: SURE (Stein 1981). v = sigma^2; u = sigma b, b ~ N(0, I); d = e u, w = u / e. Exact
  in expectation up to O(e^2) finite-difference terms.
- Gaussian, correlated with ``diffdenoise.noise``'s kernel (covariance sigma^2 C, unit diagonal): generalised
  SURE, E||f - x||^2 = E||f - y||^2 - tr(sigma^2 C) + 2 tr(sigma^2 C J_f). The probe u ~ N(0, sigma^2 C) (drawn
  as the noise itself, ``GaussianRecorruption.draw``) gives E[u^T J u] = tr(sigma^2 C J).
- Rician: as Gaussian with its sigma, exact only where the signal is well above sigma (stated, as elsewhere).
- Poisson, y = K / lambda: PURE (Luisier et al., IEEE TIP 2010). Its exact form needs f(y - e_i / lambda) per
  pixel; to first order the term is sum_i y_i (f_i(y) - f_i(y - e_i / lambda)), probed with one count per
  pixel: d = b / lambda, w = y b, b = +-1 (a count-based denoiser such as binomial thinning sees a whole count);
  v = y / lambda.
- Gamma, y = x G, G ~ Gamma(alpha, rate alpha): E[x_i f_i(y)] = E[y_i f_i(y with y_i -> S y_i)], S ~ Beta(alpha, 1)
  (Hudson's identity for the Gamma family); its first-order form is SURE with v = y^2 / (alpha + 1), the unbiased
  estimate of the variance x^2 / alpha; d = e u, w = u / e, u = sqrt(v) b, b = +-1. A recorrupted (GR2R)
  validation loss is not used: it scores f on a noisier input than y, so it estimates another denoiser's error.
- Correlated Poisson or Gamma noise (the blurred mix) is neither: no estimate, a ValueError.

Assumptions: the noise model and level are right (a wrong sigma shifts the estimate by the variance error);
the input was not clipped (``diffdenoise prepare`` keeps
synthetic noise unclipped; a real scan's normalisation clips at its p99.9, which biases the estimate in the
clipped pixels); a stochastic f must repeat its draws for inputs of the same shape (every inferer here seeds
its generator per call). The scored output is clip(f(y), 0, 1), what ``diffdenoise denoise`` writes.

Example::

    import numpy as np
    from scipy.ndimage import gaussian_filter
    from diffdenoise.quality import estimate_gain

    rng = np.random.default_rng(0)
    clean = gaussian_filter(rng.random((64, 64)), 3) * 4
    noisy = [(clean + 0.05 * rng.standard_normal(clean.shape)).astype(np.float32)]
    blur = lambda batch: gaussian_filter(batch, (0, 1, 1))
    gain = estimate_gain(blur, noisy, "gaussian", 0.05)  # gain.gain_db: estimated dB over the noisy input
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from diffdenoise.noise import NOISE_MODELS
from diffdenoise.noise_level import estimate_noise_level
from diffdenoise.recorruption import GaussianRecorruption

__all__ = ["QualityEstimate", "estimate_mse", "estimate_gain", "resolve_noise_level", "psnr_from_mse"]

# the probe's size relative to the noise (Gaussian, Gamma): its finite-difference bias grows as its square (a
# stage-1 denoiser on the demo: -1.9 dB at 0.3, -0.3 dB at 0.1, none left at 0.01 or 0.001), and float32 rounding
# of f stays far below the difference at 0.01; bfloat16 rounding would not, so estimates run in float32
PROBE_SCALE = 0.01
# the smallest MSE a PSNR is computed from: an estimate at or below zero means "far better than 100 dB"
_MSE_FLOOR = 1e-10


def psnr_from_mse(mse) -> np.ndarray:
    """PSNR in dB for data range 1; estimates at or below zero give the floor's 100 dB."""
    return 10.0 * np.log10(1.0 / np.maximum(np.asarray(mse, dtype=np.float64), _MSE_FLOOR))


def _probe(y: np.ndarray, model: str, level: float, correlation_sigma: float, generator: torch.Generator):
    """(d, w, v) for one image y (H, W): the perturbation, its weights (E[w_i d_j] = noise covariance), and the
    per-pixel noise-variance estimate (module docstring)."""
    if model in ("gaussian", "rician"):
        eps = GaussianRecorruption(level, correlation_sigma).draw(torch.as_tensor(y)[None, None], generator)
        u = level * eps[0, 0].double().numpy()
        return PROBE_SCALE * u, u / PROBE_SCALE, np.full(y.shape, level**2)
    if correlation_sigma > 0:
        raise ValueError(f"no risk estimate for correlated {model} noise (neither {model} nor Gaussian); "
                         "use noise_correlation_sigma 0 or a Gaussian model")
    signs = 2.0 * torch.randint(0, 2, y.shape, generator=generator, dtype=torch.float64).numpy() - 1.0
    y = np.maximum(y.astype(np.float64), 0.0)
    if model == "poisson":
        return signs / level, y * signs, y / level
    variance = y**2 / (level + 1.0)
    u = np.sqrt(variance) * signs
    return PROBE_SCALE * u, u / PROBE_SCALE, variance


def estimate_mse(denoiser: Callable[[np.ndarray], np.ndarray], noisy: Sequence[np.ndarray], model: str, level: float,
                 correlation_sigma: float = 0.0, seed: int = 0) -> np.ndarray:
    """Estimated MSE of clip(denoiser(y), 0, 1) against the unseen clean image, per slice (module docstring).

    Args:
        denoiser: maps float32 (1, H, W) slices in [0, 1] to denoised (1, H, W), e.g. ``diffdenoise.denoise.Model``.
            It is called twice per slice, with the same shape, so a seeded stochastic inferer repeats its draws.
        noisy: 2-D noisy slices (H, W) in [0, 1], unclipped where possible.
        model: one of ``diffdenoise.noise.NOISE_MODELS``.
        level: sigma (Gaussian, Rician), lambda (Poisson) or alpha (Gamma), in the units of ``noisy``.
        correlation_sigma: the correlated Gaussian model's kernel std (pixels); 0 for i.i.d. noise.
        seed: fixes the probes.

    Returns:
        float64 (len(noisy),) estimated MSE per slice; it can fall below zero for a near-perfect output.

    Raises:
        ValueError: an unknown model, a level <= 0, or correlated Poisson/Gamma noise.
    """
    if model not in NOISE_MODELS:
        raise ValueError(f"noise model {model!r} is not one of {', '.join(NOISE_MODELS)}")
    if not level > 0:
        raise ValueError(f"noise level must be > 0 for a risk estimate, got {level}")
    generator = torch.Generator().manual_seed(int(seed))
    estimates = []
    for image in noisy:
        y = np.asarray(image, dtype=np.float32)
        d, w, v = _probe(y, model, float(level), float(correlation_sigma), generator)
        f = np.clip(denoiser(y[None])[0].astype(np.float64), 0.0, 1.0)
        f_probed = np.clip(denoiser((y + d).astype(np.float32)[None])[0].astype(np.float64), 0.0, 1.0)
        estimates.append(np.mean((f - y) ** 2) - np.mean(v) + 2.0 * np.mean(w * (f_probed - f)))
    return np.asarray(estimates)


def _identity(batch: np.ndarray) -> np.ndarray:
    return batch


@dataclass(frozen=True)
class QualityEstimate:
    """Estimated PSNR (dB, data range 1) of the noisy input and of a denoiser's output, per slice.

    ``gain_db`` is their mean difference: > 0 when the output is estimated to be better than the input.
    """

    psnr_input: np.ndarray
    psnr_output: np.ndarray
    noise_model: str
    noise_level: float
    noise_correlation_sigma: float

    @property
    def gain_db(self) -> float:
        return float(np.mean(self.psnr_output - self.psnr_input))

    @property
    def implausible_slices(self) -> int:
        """Slices whose output MSE was estimated at or below zero: no output is that good, so the noise level
        (or model) is wrong there, most likely too high, and the gain is overstated."""
        return int(np.sum(self.psnr_output >= psnr_from_mse(0.0)))

    def summary(self) -> dict:
        """The JSON-ready numbers: mean estimated PSNRs, the gain, the slice count and the noise used."""
        return {"estimated_psnr_input_db": round(float(np.mean(self.psnr_input)), 3),
                "estimated_psnr_output_db": round(float(np.mean(self.psnr_output)), 3),
                "estimated_gain_db": round(self.gain_db, 3), "estimate_slices": len(self.psnr_input),
                "implausible_slices": self.implausible_slices,
                "noise_model": self.noise_model, "noise_level": self.noise_level,
                "noise_correlation_sigma": self.noise_correlation_sigma}


def estimate_gain(denoiser: Callable[[np.ndarray], np.ndarray], noisy: Sequence[np.ndarray], model: str,
                  level: float, correlation_sigma: float = 0.0, seed: int = 0) -> QualityEstimate:
    """The estimated PSNR of the input (the identity, clipped like any output) and of ``denoiser``, per slice;
    arguments as ``estimate_mse``."""
    def psnr(f):
        return psnr_from_mse(estimate_mse(f, noisy, model, level, correlation_sigma, seed))

    return QualityEstimate(psnr(_identity), psnr(denoiser), model, float(level), float(correlation_sigma))


def resolve_noise_level(noisy: Sequence[np.ndarray], model: str, level: float | None,
                        correlation_sigma: float = 0.0) -> tuple[float, str]:
    """The level to estimate with and where it came from: ``level`` when known ("bundle"), else measured on
    ``noisy`` with ``diffdenoise.noise_level`` ("estimated")."""
    if level is not None:
        return float(level), "bundle"
    return float(estimate_noise_level(list(noisy), model, correlation_sigma)), "estimated"
