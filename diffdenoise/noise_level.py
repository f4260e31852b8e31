"""Noise level estimation from noisy images alone (patch PCA), for targets that need the level.

Method (Chen, Zhu & Heng, "An efficient statistical method for image noise level estimation",
ICCV 2015): take every ``patch`` x ``patch`` window of the image as a vector of r = patch^2 values,
form their covariance S and its eigenvalues lambda_1 >= ... >= lambda_r. If the clean signal spans
only a few directions of patch space, the remaining eigenvalues all equal the noise variance sigma^2
(up to sampling spread). Chen's rule finds that tail: drop the largest eigenvalue until the mean tau
of the rest is no longer above their median (here: at least as many eigenvalues above tau as below;
the paper asks for equality, which can be skipped over), then sigma^2 = tau.

Correlated Gaussian noise of a KNOWN kernel (``diffdenoise.noise``, kernel std ``correlation_sigma``):
its patch covariance is sigma^2 C with C = (g^2 A + I) / 2, A the autocorrelation of the 2-D blur
kernel b over the patch's lags and g^2 = 1 / sum b^2 (the rescale to unit power). C comes from the
kernel, not from simulation (``correlated_patch_covariance``). The tail rule is applied to the
generalised eigenvalues of (S, C), i.e. those of C^-1/2 S C^-1/2, where that noise is white again.

Other models reduce to the Gaussian case by a transform whose noise is (nearly) constant:

- Rician (``level`` sigma): magnitude noise is Gaussian with std sigma where the signal is well above
  sigma (Rayleigh, 0.65 sigma, at 0); only patches whose mean is >= 5 sigma are used (sigma from a
  first pass over all, then two passes).
- Poisson (``level`` lambda, y = Poisson(lambda x) / lambda): Anscombe's z = 2 sqrt(lambda y + 3/8) has
  unit noise variance once lambda x >~ 10 counts. lambda is unknown, so it is a fixed point: start
  at lambda = 1 / sigma(2 sqrt y)^2, then lambda <- lambda / sigma(z)^2, four times (one suffices when
  z is exact). Regressing local variance on local mean was not used: texture biases it as it does
  a plain MAD, and the transform lets the patch PCA separate texture from noise.
- Gamma (``level`` alpha, y = x Gamma(alpha, rate alpha)): log y = log x + log g has noise variance
  trigamma(alpha) for every x > 0; alpha solves trigamma(alpha) = sigma(log y)^2.
- Poisson and Gamma use only patches in the brighter half of the image (local mean >= the median
  over usable pixels; also >= 20 counts for Poisson, >= 0.1 for Gamma): there the model's noise
  grows (as x, x^2) while a reference's own additive noise and quantisation steps do not (halves
  the bias on the real MRI below; no effect on synthetic ones).
- Correlated Poisson or Gamma: not supported (the blur mixes non-Gaussian noise of unequal
  variance); set ``noise_level`` in the config.

Choices: pixels on an exactly constant plateau at the image minimum or maximum (zero padding, a
zeroed background, clipping, Poisson zeros) are left out, with every patch that touches them: such
patches hold no noise and would pull the estimate down (a noisy image in a zero frame as large as
itself reads -41% without this). All remaining patches are used (stride 1), their covariance
accumulated in row blocks; a slice needs >= 10 r usable patches. A dataset's level is the median of
per-slice estimates (robust to an odd slice). Pooling the slices' covariances instead mixes their
signal subspaces and read a little higher (8 synthetic slices +0.6% vs +0.3%; 16 MRI slices with
6/255: +58% vs +54%).

Assumptions: the noise is stationary after the model's transform (one level per image); the clean
signal is low-rank in patch space (smooth regions, blurred edges; not texture at the pixel scale);
with correlation, the kernel is the project's. The estimate is ALL the noise in the image: a
reference's own noise, and detail at the pixel scale, read as noise too.

Measured. Synthetic images (tests/test_noise_level.py's ``clean_image``, 160 px smooth field plus
stripes and a disk with 1-px-blurred edges, one slice, 8 seeds; worst / mean relative error):
Gaussian 6/255 i.i.d. +0.8% / +0.2%, kernel 0.5 +0.9% / -0.0%, kernel 1.2 +0.6% / +0.2%; Rician
+0.8% / +0.2%; Poisson 200 +7.8% / +0.0%, 700 -3.1% / -1.4%; Gamma 100 +2.5% / -0.3%, 500 -2.8% /
-0.7% (lambda and alpha go as 1 / variance, so their sampling error is twice sigma's; the dataset
median over slices shrinks it). Unblurred (aliased) curved edges read as noise: +2% to +7%.

Real slices (``OMP_NUM_THREADS=1 python scripts/noise_level_errors.py``, 16 slices, seed 0; ``est``
against the synthetic level; ``clean``: what the clean slices alone read, as a share of the
synthetic noise variance; ``vs total``: est against synthetic plus that share)::

    data    model     corr    level     est  clean vs total  skimage
    mri     gaussian   0.0  0.02353  +57.3%   1.49    -0.3%   +28.4%
    mri     gaussian   1.2  0.02353  +98.4%   2.95    -0.1%    +0.5%
    mri     gaussian   0.5  0.02353  +70.5%   1.91    -0.0%   +15.9%
    mri     poisson    0.0      200  -24.5%   0.31    -1.0%        -
    mri     gamma      0.0      100  -43.0%   0.65    -6.3%        -
    mri/2   gaussian   0.0  0.02353  +79.5%   2.33    -1.6%   +33.6%
    mri/2   gaussian   1.2  0.02353 +137.2%   4.72    -0.8%    +4.8%
    mri/2   gaussian   0.5  0.02353  +96.0%   3.07    -2.8%   +20.6%
    mri/2   poisson    0.0      200  -57.5%   1.33    -1.1%        -
    mri/2   gamma      0.0      100  -66.5%   1.86    -5.0%        -
    xray    gaussian   0.0  0.02353  +47.8%   1.19    -0.2%   +43.0%
    xray    gaussian   1.2  0.02353  +86.3%   2.46    +0.1%   +23.8%
    xray    gaussian   0.5  0.02353  +57.3%   1.47    +0.1%   +33.8%
    xray    poisson    0.0      700  -40.2%   0.66    -0.7%        -
    xray    gamma      0.0      500  -38.3%   0.61    -0.7%        -
    xray/2  gaussian   0.0  0.02353  +20.5%   0.49    -1.3%   +18.0%
    xray/2  gaussian   1.2  0.02353  +40.7%   0.98    +0.0%    -5.2%
    xray/2  gaussian   0.5  0.02353  +25.8%   0.59    -0.1%    +7.2%
    xray/2  poisson    0.0      700  -18.1%   0.20    -1.8%        -
    xray/2  gamma      0.0      500  -16.6%   0.18    -1.4%        -

What we see: the 5% target against the synthetic level is missed on every real case, because the
"clean" references are not clean at the pixel scale. Their power spectrum, in units of the
synthetic 6/255 white noise, is still 2.4 (MRI, brain centre) and 1.0 (X-ray, a white floor: 8-bit
and CLAHE) in the highest-frequency band, and 2x2 averaging does not remove the MRI's (anatomy at
the pixel scale, not white noise). The estimator adds that share to the synthetic noise almost
exactly (``vs total`` within 3% for Gaussian, 7% for Gamma). skimage's MAD reads less on the MRI
only because its median is taken mostly over the zeroed background, where only the synthetic noise
lives, and reads too little for correlated noise (its finest wavelet band misses it).
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.linalg import eigh
from scipy.ndimage import uniform_filter
from scipy.optimize import brentq
from scipy.special import polygamma

from diffdenoise.errors import InputError
from diffdenoise.noise import NOISE_MODELS
from diffdenoise.recorruption import gaussian_kernel1d

_MIN_PATCHES_PER_DIM = 10  # fewest usable patches per patch dimension r for a stable covariance
_RICIAN_MIN_SNR = 5.0  # Rician patches need mean >= this many sigma to be Gaussian-like
_POISSON_MIN_COUNT = 20.0  # Poisson patches need lambda * mean >= this for Anscombe's transform
_GAMMA_MIN_MEAN = 0.1  # Gamma patches need mean >= this (normalised): darker, log x steps like noise
_ROW_BLOCK = 32  # rows of patch origins per block when accumulating the covariance


def correlated_patch_covariance(correlation_sigma: float, patch: int = 7) -> np.ndarray:
    """Patch covariance C of the project's correlated noise at unit marginal variance.

    n = (g b*n1 + n2) / sqrt 2 with n1, n2 white (variance 1), b the Gaussian kernel of std
    ``correlation_sigma`` as ``scipy.ndimage.gaussian_filter`` builds it (truncate 4, per axis
    normalised) and g^2 = 1 / sum b^2. Then Cov(n_p, n_q) = (g^2 A(p - q) + [p = q]) / 2 with A the
    kernel's autocorrelation; b is separable, so A is the outer product of 1-D autocorrelations.

    Args:
        correlation_sigma: kernel std in pixels; 0 gives the identity (white noise).
        patch: patch side; patches are flattened row-major, as ``estimate_gaussian_sigma`` does.

    Returns:
        ``(patch**2, patch**2)`` symmetric positive definite matrix with unit diagonal.
    """
    identity = np.eye(patch * patch)
    if correlation_sigma == 0:
        return identity
    weights = gaussian_kernel1d(correlation_sigma)
    radius = len(weights) // 2
    autocorrelation = np.correlate(weights, weights, mode="full")  # lags -2 radius .. 2 radius
    lags = np.abs(np.subtract.outer(np.arange(patch), np.arange(patch)))
    within = lags <= 2 * radius
    toeplitz = np.where(within, autocorrelation[2 * radius + np.minimum(lags, 2 * radius)], 0.0)
    power = np.sum(weights**2) ** 2  # sum of the squared 2-D weights
    return (np.kron(toeplitz, toeplitz) / power + identity) / 2


def estimate_gaussian_sigma(image: np.ndarray, correlation_sigma: float = 0.0, patch: int = 7) -> float:
    """Std of additive Gaussian noise in one 2-D image, by patch PCA (Chen et al., ICCV 2015).

    Example::

        import numpy as np
        from diffdenoise.noise import SyntheticNoise
        from diffdenoise.noise_level import estimate_gaussian_sigma

        yy, xx = np.mgrid[:128, :128] / 128
        clean = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + 0.2 * (xx > 0.5)
        noisy = SyntheticNoise("gaussian", 6 / 255, correlation_sigma=1.2, seed=0)(clean, image_id="a")
        print(estimate_gaussian_sigma(noisy, correlation_sigma=1.2) * 255)  # about 6

    Args:
        image: ``(H, W)`` array, e.g. a slice in [0, 1]; any float range works.
        correlation_sigma: std in pixels of the kernel that correlates the noise
            (``diffdenoise.noise``); 0 for i.i.d. noise.
        patch: patch side in pixels (r = patch^2 dimensions); 7 suits 2-D slices of 64 px and up.

    Returns:
        The marginal noise std, in the image's units.

    Raises:
        ValueError: not 2-D, non-finite values, a bad ``patch`` or ``correlation_sigma``, or fewer
            than 10 patch^2 patches off constant plateaus.
    """
    image = _check_image(image, patch)
    if not correlation_sigma >= 0:
        raise ValueError(f"correlation_sigma {correlation_sigma} must be >= 0 pixels (0 for i.i.d. noise)")
    return _patch_sigma(image, ~_plateaus(image), patch, correlated_patch_covariance(correlation_sigma, patch))


def estimate_noise_level(images, model: str, correlation_sigma: float = 0.0) -> float:
    """A dataset's noise level in the units of ``diffdenoise.noise.SyntheticNoise``'s ``level``.

    Each slice is estimated on its own (see the module docstring for each model's transform) and
    the median is returned; slices with too few usable patches are skipped.

    Example::

        import numpy as np
        from diffdenoise.noise import SyntheticNoise
        from diffdenoise.noise_level import estimate_noise_level

        yy, xx = np.mgrid[:128, :128] / 128
        clean = 0.4 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + 0.2 * (xx > 0.5)
        noise = SyntheticNoise("poisson", 200.0, seed=0)
        print(estimate_noise_level([noise(clean, image_id=str(k)) for k in range(3)], "poisson"))  # ~200

    Args:
        images: sequence of noisy 2-D float slices in [0, 1] (numpy arrays or array-likes).
        model: one of ``diffdenoise.noise.NOISE_MODELS``.
        correlation_sigma: std in pixels of the noise's correlation kernel; 0 for i.i.d. noise.
            Only "gaussian" and "rician" support correlated noise.

    Returns:
        sigma ("gaussian", "rician"), lambda ("poisson") or alpha ("gamma").

    Raises:
        ValueError: an unknown model, correlated Poisson or Gamma noise, no images, or no slice with
            enough usable patches.
    """
    if model not in NOISE_MODELS:
        raise ValueError(f"model {model!r} is not one of {', '.join(NOISE_MODELS)}")
    if not correlation_sigma >= 0:
        raise ValueError(f"correlation_sigma {correlation_sigma} must be >= 0 pixels (0 for i.i.d. noise)")
    if correlation_sigma > 0 and model in ("poisson", "gamma"):
        raise ValueError(
            f"the level of correlated {model} noise cannot be estimated; set `noise_level` in the config"
        )
    images = list(images)
    if not images:
        raise ValueError("no images to estimate the noise level from; pass at least one 2-D slice")
    estimates, problems = [], []
    for image in images:
        try:
            estimates.append(_ESTIMATORS[model](_check_image(image, 7), correlation_sigma))
        except _TooFewPatches as exc:
            problems.append(str(exc))
    if not estimates:
        raise ValueError(f"no slice has enough usable patches ({problems[0]}); pass larger slices")
    return float(np.median(estimates))


def estimate_from_datalist(
    datalist_path, model: str, correlation_sigma: float = 0.0, split: str = "training", max_slices: int = 16
) -> float:
    """``estimate_noise_level`` on up to ``max_slices`` evenly spaced slices of a prepared datalist.

    Example::

        from diffdenoise.noise_level import estimate_from_datalist

        sigma = estimate_from_datalist("prepared/datalist.json", "gaussian", correlation_sigma=1.2)

    Args:
        datalist_path: ``datalist.json`` written by ``diffdenoise.data.prepare``; each item's
            ``image`` is a float32 ``(H, W)`` .npy slice in [0, 1].
        model, correlation_sigma: as in ``estimate_noise_level``.
        split: "training", "validation" or "test".
        max_slices: most slices read, spread evenly over the split.

    Returns:
        The level, as ``estimate_noise_level``.

    Raises:
        InputError: the datalist is missing, its split has no slices, or a slice is not a 2-D array.
        ValueError: as ``estimate_noise_level``, or ``max_slices`` < 1.
    """
    from diffdenoise.data import evenly_spaced, load_datalist  # data imports the noise models; keep this module light

    if not max_slices >= 1:
        raise ValueError(f"max_slices {max_slices} must be >= 1, e.g. 16")
    items = load_datalist(datalist_path, split)
    if not items:
        raise InputError(datalist_path, f"split {split!r} has no slices; pick a split that has, or run prepare")
    picks = evenly_spaced(len(items), max_slices)
    images = []
    for k in picks:
        path = items[k]["image"]
        array = np.load(path)
        if array.ndim != 2:
            raise InputError(path, f"slice of shape {array.shape} is not 2-D (H, W); re-run prepare")
        images.append(array)
    return estimate_noise_level(images, model, correlation_sigma)


class _TooFewPatches(ValueError):
    """A slice has too few patches off constant plateaus (or above a model's intensity floor)."""


def _check_image(image, patch: int) -> np.ndarray:
    """The image as float64 (H, W), checked to be 2-D, finite and larger than the patch."""
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or patch < 2:
        raise ValueError(f"patch {patch!r} must be an integer >= 2, e.g. 7")
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"image shape {image.shape} is not 2-D (H, W); pass one slice at a time")
    if not np.isfinite(image).all():
        raise ValueError("image has NaN or Inf values; replace them (e.g. by 0) first")
    if min(image.shape) < patch:
        raise ValueError(f"image shape {image.shape} is smaller than the {patch}x{patch} patch")
    return image


def _plateaus(image: np.ndarray) -> np.ndarray:
    """Pixels at the image's minimum or maximum value when that value repeats (padding, clipping)."""
    flat = np.zeros(image.shape, dtype=bool)
    for value in (image.min(), image.max()):
        at = image == value
        if at.sum() > 1:
            flat |= at
    return flat


def _patch_mask(valid: np.ndarray, patch: int) -> np.ndarray:
    """True at each patch origin whose ``patch`` x ``patch`` window holds only valid pixels."""
    bad = np.pad((~valid).astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)  # integral image
    p = patch
    count = bad[p:, p:] - bad[:-p, p:] - bad[p:, :-p] + bad[:-p, :-p]
    return count == 0


def _patch_covariance(image: np.ndarray, valid: np.ndarray, patch: int) -> tuple[np.ndarray, int]:
    """Covariance of all fully valid patches (row-major vectors), accumulated in row blocks."""
    origins = _patch_mask(valid, patch)
    r = patch * patch
    centre = image[valid].mean() if valid.any() else 0.0  # centring first keeps the sums exact
    windows = sliding_window_view(image - centre, (patch, patch))
    total, outer, count = np.zeros(r), np.zeros((r, r)), 0
    for top in range(0, origins.shape[0], _ROW_BLOCK):
        keep = origins[top : top + _ROW_BLOCK]
        vectors = windows[top : top + _ROW_BLOCK][keep].reshape(-1, r)
        total += vectors.sum(0)
        outer += vectors.T @ vectors
        count += len(vectors)
    if count < _MIN_PATCHES_PER_DIM * r:
        raise _TooFewPatches(
            f"{count} usable {patch}x{patch} patches, fewer than {_MIN_PATCHES_PER_DIM * r} (10 patch^2)"
        )
    mean = total / count
    return (outer - count * np.outer(mean, mean)) / (count - 1), count


def _tail_variance(eigenvalues: np.ndarray) -> float:
    """Chen's rule: the mean of the largest-index tail whose mean is not above its median."""
    values = np.sort(eigenvalues)[::-1]
    for start in range(len(values)):
        tail = values[start:]
        tau = tail.mean()
        if np.sum(tail > tau) >= np.sum(tail < tau):
            return float(max(tau, 0.0))
    return float(max(values[-1], 0.0))


def _patch_sigma(image: np.ndarray, valid: np.ndarray, patch: int, covariance: np.ndarray) -> float:
    """Noise std from the patch covariance, whitened by the noise's own patch covariance."""
    sample, _ = _patch_covariance(image, valid, patch)
    return float(np.sqrt(_tail_variance(eigh(sample, covariance, eigvals_only=True))))


def _gaussian(image: np.ndarray, correlation_sigma: float) -> float:
    return estimate_gaussian_sigma(image, correlation_sigma)


def _local_mean(image: np.ndarray, patch: int = 7) -> np.ndarray:
    """Mean of each pixel's patch-sized neighbourhood, so a threshold on it selects whole patches."""
    return uniform_filter(image, patch, mode="nearest")


def _rician(image: np.ndarray, correlation_sigma: float) -> float:
    covariance = correlated_patch_covariance(correlation_sigma)
    base = ~_plateaus(image)
    sigma = _patch_sigma(image, base, 7, covariance)
    local = _local_mean(image)
    for _ in range(2):
        sigma = _patch_sigma(image, base & (local >= _RICIAN_MIN_SNR * sigma), 7, covariance)
    return sigma


def _bright(image: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float]:
    """Local means, and the median local mean over valid pixels: the floor of the brighter half."""
    local = _local_mean(image)
    return local, float(np.median(local[valid])) if valid.any() else np.inf


def _poisson(image: np.ndarray, correlation_sigma: float) -> float:
    valid = ~_plateaus(image) & (image > 0)
    local, floor = _bright(image, valid)
    white = correlated_patch_covariance(0.0)
    spread = _patch_sigma(2 * np.sqrt(np.clip(image, 0, None)), valid & (local >= floor), 7, white)
    for _ in range(4):  # the first pass sets lambda = 1 / spread^2, then fixed-point steps
        if not spread > 0:
            raise _TooFewPatches("no noise found in sqrt(y); the image may be noise-free")
        lam = 1 / spread**2 if _ == 0 else lam / spread**2
        z = 2 * np.sqrt(lam * np.clip(image, 0, None) + 0.375)
        spread = _patch_sigma(z, valid & (local >= max(floor, _POISSON_MIN_COUNT / lam)), 7, white)
    return float(lam / spread**2)


def _gamma(image: np.ndarray, correlation_sigma: float) -> float:
    valid = ~_plateaus(image) & (image > 0)
    local, floor = _bright(image, valid)
    log_image = np.log(np.where(image > 0, image, 1.0))
    variance = _patch_sigma(log_image, valid & (local >= max(floor, _GAMMA_MIN_MEAN)), 7, np.eye(49)) ** 2
    return _inverse_trigamma(variance)


def _inverse_trigamma(variance: float) -> float:
    """alpha with trigamma(alpha) = variance (trigamma decreases from +inf to 0)."""
    if not variance > 0:
        raise _TooFewPatches("no noise found in log(y); the image may be noise-free")
    # 1/a + 1/(2 a^2) < trigamma(a) < 1/a + 1/a^2 for a > 0, so the root lies in [1/v, 1/v + 1]
    return float(brentq(lambda a: polygamma(1, a) - variance, 1 / variance, 1 / variance + 1))


_ESTIMATORS = {"gaussian": _gaussian, "rician": _rician, "poisson": _poisson, "gamma": _gamma}
