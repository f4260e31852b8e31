"""Classical baselines on one 2D slice: non-local means, BM3D and total variation, parameters set from sigma.

Every constant comes from the method's paper or library defaults, never from scores on our test split:
- NLM (Buades et al., CVPR 2005), scikit-image: the library's own recipe in its gallery example
  "Non-local means denoising for preserving textures": ``h = 0.8 * sigma`` with ``sigma`` passed (patch
  distances minus the expected noise variance), ``patch_size=5``, ``patch_distance=6``, ``fast_mode=True``.
- BM3D (Dabov et al., TIP 2007), package ``bm3d`` (Mäkinen et al. 2020): the package default profile
  ``"np"``, both stages (hard thresholding, then Wiener), noise std ``sigma``.
- TV (Rudin, Osher and Fatemi, Physica D 1992), scikit-image's Chambolle solver: ROF's own rule, the
  discrepancy principle: the weight at which the removed residual has exactly the noise power,
  ``mean((u - f)^2) = sigma^2``, found by bisection on ``log(weight)``.

``sigma`` is the noise standard deviation in image units (15/255 for the paper's scale on [0, 1]); None
estimates it with scikit-image's wavelet MAD estimator (Donoho and Johnstone 1994), ``estimate_sigma``.
"""

from __future__ import annotations

import numpy as np
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle, estimate_sigma

__all__ = ["denoise_bm3d", "denoise_nlm", "denoise_tv"]

_TV_BISECTIONS = 20  # narrows the [sigma/100, 100 sigma] bracket, in log space, to a factor 1.00001


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2 or not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"image must be one 2D float slice (H, W), got shape {image.shape} and dtype {image.dtype}. "
            "Denoise volumes slice by slice and convert with `image.astype(np.float32)`."
        )
    return image


def _noise_sigma(image: np.ndarray, sigma: float | None) -> float:
    """The caller's sigma, checked, or the wavelet MAD estimate when None."""
    if sigma is None:
        return float(estimate_sigma(image, channel_axis=None))
    if not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(
            f"sigma must be a positive noise standard deviation in image units, got {sigma!r}. "
            "Pass e.g. 15/255 for images in [0, 1], or None to estimate it from the image."
        )
    return float(sigma)


def denoise_nlm(image: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Non-local means with scikit-image's recipe: ``h = 0.8 sigma``, 5x5 patches, 13x13 search window.

    Args:
        image: one slice ``(H, W)``, float, any range (the paper's is [0, 1]).
        sigma: noise standard deviation in image units; None estimates it.

    Returns:
        The denoised slice, same shape and dtype as ``image``.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> clean = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
        >>> noisy = clean + rng.normal(0, 15 / 255, clean.shape).astype(np.float32)
        >>> denoise_nlm(noisy, sigma=15 / 255).shape
        (64, 64)
    """
    image = _check_image(image)
    sigma = _noise_sigma(image, sigma)
    out = denoise_nl_means(image, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True)
    return out.astype(image.dtype, copy=False)


def denoise_bm3d(image: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """BM3D with the ``bm3d`` package's default profile, both stages.

    Args:
        image: one slice ``(H, W)``, float, any range.
        sigma: noise standard deviation in image units; None estimates it.

    Returns:
        The denoised slice, same shape and dtype as ``image``.

    Raises:
        ImportError: the optional ``bm3d`` package is not installed.

    Example:
        >>> import numpy as np
        >>> noisy = np.random.default_rng(0).normal(0.5, 15 / 255, (64, 64)).astype(np.float32)
        >>> float(denoise_bm3d(noisy).std()) < float(noisy.std())
        True
    """
    try:
        import bm3d
    except ImportError as err:
        raise ImportError(
            "denoise_bm3d needs the optional `bm3d` package: `pip install diffdenoise[baselines]` "
            "(or `pip install bm3d`)."
        ) from err
    image = _check_image(image)
    sigma = _noise_sigma(image, sigma)
    return np.asarray(bm3d.bm3d(image, sigma_psd=sigma), dtype=image.dtype)


def _tv_weight(image: np.ndarray, sigma: float) -> float:
    """ROF's discrepancy principle: the weight whose residual power equals sigma^2 (bisection in log space).

    The residual power grows monotonically with the weight, from 0 to the image's variance; when even
    the flattest result keeps less than sigma^2 (sigma over-estimated), the bracket's top is returned.
    """
    log_low, log_high = np.log(sigma / 100), np.log(sigma * 100)
    for _ in range(_TV_BISECTIONS):
        log_mid = 0.5 * (log_low + log_high)
        residual = np.mean((denoise_tv_chambolle(image, weight=np.exp(log_mid)) - image) ** 2)
        if residual > sigma**2:
            log_high = log_mid
        else:
            log_low = log_mid
    return float(np.exp(0.5 * (log_low + log_high)))


def denoise_tv(image: np.ndarray, weight: float | None = None, sigma: float | None = None) -> np.ndarray:
    """Total-variation (ROF) denoising, Chambolle's solver; the weight from sigma by ROF's discrepancy rule.

    Args:
        image: one slice ``(H, W)``, float, any range.
        weight: Chambolle weight (larger smooths more); None chooses it from ``sigma`` (module docstring).
        sigma: noise standard deviation in image units, used only to choose the weight; None estimates it.

    Returns:
        The denoised slice, same shape and dtype as ``image``.

    Raises:
        ValueError: both ``weight`` and ``sigma`` given, or a non-positive one.

    Example:
        >>> import numpy as np
        >>> noisy = np.random.default_rng(0).normal(0.5, 15 / 255, (64, 64)).astype(np.float32)
        >>> denoise_tv(noisy, sigma=15 / 255).dtype
        dtype('float32')
    """
    image = _check_image(image)
    if weight is not None and sigma is not None:
        raise ValueError(
            f"denoise_tv got both weight={weight!r} and sigma={sigma!r}; sigma only serves to choose the "
            "weight. Pass one of them."
        )
    if weight is None:
        weight = _tv_weight(image, _noise_sigma(image, sigma))
    elif not np.isfinite(weight) or weight <= 0:
        raise ValueError(f"weight must be positive, got {weight!r}. Pass e.g. 0.1, or None to set it from sigma.")
    return denoise_tv_chambolle(image, weight=weight).astype(image.dtype, copy=False)
