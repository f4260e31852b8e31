"""Synthetic noise models of DiffDenoise (Demir et al., Sec. 4.1) as MONAI transforms.

Images are normalised to [0, 1]. Paper symbols and the arguments that hold them:

- x: clean image; x': noisy image; n = x' - x: the noise.
- Gaussian, sigma = ``level``: x' = x + sigma n, n ~ N(0, 1).
- Poisson, lambda = ``level``: x' = Poisson(lambda x) / lambda, so Var(n) = x / lambda.
- Gamma, alpha = ``level``, beta = ``gamma_rate`` (default alpha, so E[g] = 1): x' = x g,
  g ~ Gamma(shape alpha, rate beta); numpy's ``scale`` is 1 / beta.
- Rician (MRI magnitude; not in the paper), sigma = ``level``: x' = |x + sigma (n_re + i n_im)|.
- Spatially correlated variant, kernel std = ``correlation_sigma`` (pixels; the paper uses 0.5 and
  1.2): n = (blur(n1) * sqrt(P(n1) / P(blur(n1))) + n2) / sqrt(2), with n1, n2 two independent i.i.d.
  draws of the model's noise and P the mean square per channel. Rician correlates n_re and n_im.

Every image gets ONE fixed realisation: all randomness comes from ``realisation_rng(seed, image_id)``,
so an image is noised identically in every epoch, DataLoader worker and process, and a cache
(``CacheDataset``) may safely store the noisy result.
"""

import hashlib
import numbers

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type
from scipy.ndimage import gaussian_filter

NOISE_MODELS = ("gaussian", "poisson", "gamma", "rician")

# The paper's noise levels (Sec. 4.1); each value is the model's `level`: sigma | lam | alpha.
# CT is not in the paper; it reuses the MRI levels. Rician reuses the Gaussian sigma.
_MRI_LEVELS = {"gaussian": 6 / 255, "poisson": 200.0, "gamma": 100.0, "rician": 6 / 255}
PAPER_LEVELS = {
    "mri": _MRI_LEVELS,
    "xray": {"gaussian": 6 / 255, "poisson": 700.0, "gamma": 500.0, "rician": 6 / 255},
    "ct": dict(_MRI_LEVELS),
}

# What `level` means per model, for error messages.
_LEVEL_SYMBOL = {"gaussian": "sigma", "poisson": "lam", "gamma": "alpha", "rician": "sigma"}


def realisation_rng(seed: int, image_id: str) -> np.random.Generator:
    """Returns the generator that fixes the noise of one image.

    The seed comes from SHA-256 of ``"{seed}:{image_id}"``, not Python's ``hash()`` (salted per
    process), so the same pair gives bit-identical noise in any order, worker or process.

    Args:
        seed: experiment seed (any integer).
        image_id: stable identifier of the image, e.g. its datalist id.

    Returns:
        A fresh ``numpy.random.Generator`` (PCG64).
    """
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _blur_keep_power(n: np.ndarray, sigma: float, spatial_axes: tuple[int, ...]) -> np.ndarray:
    """Blurs noise over the spatial axes, then rescales it to its pre-blur mean square per channel."""
    sigmas = [sigma if axis in spatial_axes else 0.0 for axis in range(n.ndim)]
    blurred = gaussian_filter(n, sigmas, mode="reflect")
    power = np.mean(n**2, axis=spatial_axes, keepdims=True)
    blurred_power = np.mean(blurred**2, axis=spatial_axes, keepdims=True)
    ratio = np.divide(power, blurred_power, out=np.zeros_like(power), where=blurred_power > 0)
    return blurred * np.sqrt(ratio)


def noise_variance(model: str, level: float, signal, gamma_rate: float | None = None):
    """Per-pixel variance of a model's noise n = x' - x given the clean signal x (array or tensor).

    Gaussian and Rician (its Gaussian parts, the high-SNR limit): sigma^2. Poisson: x / lambda.
    Gamma: x^2 alpha / beta^2. The correlated variants have the same marginal variance (the blurred
    draw is rescaled to its power, then mixed 1:1 with an independent draw and divided by sqrt 2).
    Negative signal, e.g. an estimate that undershoots 0, counts as 0 for Poisson.

    Raises:
        ValueError: an unknown model or a level out of range (as ``SyntheticNoise``).
    """
    SyntheticNoise(model, level, gamma_rate=gamma_rate)  # validates the arguments
    if model == "poisson":
        return signal * (signal > 0) / level
    if model == "gamma":
        rate = level if gamma_rate is None else gamma_rate
        return signal**2 * (level / rate**2)
    return signal * 0.0 + level**2


class SyntheticNoise(Transform):
    """Adds one fixed realisation of a paper noise model to an image in [0, 1].

    Not ``Randomizable`` on purpose: the noise depends only on ``(seed, image_id)``.

    Example::

        import numpy as np
        from diffdenoise.noise import PAPER_LEVELS, SyntheticNoise

        clean = np.full((1, 64, 64), 0.5, dtype=np.float32)
        noise = SyntheticNoise("poisson", PAPER_LEVELS["mri"]["poisson"], correlation_sigma=0.5, seed=0)
        noisy = noise(clean, image_id="sub-01/slice-090")
        assert np.array_equal(noisy, noise(clean, image_id="sub-01/slice-090"))

    Args:
        model: one of ``NOISE_MODELS``.
        level: sigma (gaussian, rician), lam (poisson) or alpha (gamma); see ``PAPER_LEVELS``.
        correlation_sigma: std in pixels of the Gaussian kernel that correlates the noise; 0 for i.i.d.
        seed: experiment seed; with the image id it fixes the realisation.
        gamma_rate: Gamma rate beta; None means beta = alpha (mean 1). Gamma model only.
        clip: clip the result to [0, 1]. Off by default so noise statistics stay exact.

    Raises:
        ValueError: an unknown model, or a level, correlation_sigma, gamma_rate or seed out of range.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        model: str = "gaussian",
        level: float = 6 / 255,
        correlation_sigma: float = 0.0,
        seed: int = 0,
        gamma_rate: float | None = None,
        clip: bool = False,
    ) -> None:
        if model not in NOISE_MODELS:
            raise ValueError(f"model {model!r} is not one of {', '.join(NOISE_MODELS)}")
        positive = model in ("poisson", "gamma")  # lam divides, alpha is a Gamma shape
        if not (level > 0 if positive else level >= 0):
            raise ValueError(
                f"level {level} is invalid for model {model!r}: it is {_LEVEL_SYMBOL[model]} and must be "
                f"{'> 0' if positive else '>= 0'}, e.g. {PAPER_LEVELS['mri'][model]:.6g} "
                "(PAPER_LEVELS['mri'])"
            )
        if not correlation_sigma >= 0:
            raise ValueError(
                f"correlation_sigma {correlation_sigma} must be >= 0 (pixels): 0 for i.i.d. noise, "
                "0.5 or 1.2 for the paper's correlated noise"
            )
        if gamma_rate is not None and model != "gamma":
            raise ValueError(f"gamma_rate is only used by model 'gamma', not {model!r}; remove it")
        if gamma_rate is not None and not gamma_rate > 0:
            raise ValueError(f"gamma_rate {gamma_rate} must be > 0, or None for beta = alpha (mean 1)")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed {seed!r} must be an integer")
        self.model = model
        self.level = float(level)
        self.correlation_sigma = float(correlation_sigma)
        self.seed = int(seed)
        self.gamma_rate = self.level if gamma_rate is None else float(gamma_rate)
        self.clip = clip

    def _iid_noise(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draws n = x' - x of the model, independent per pixel (Gaussian parts for Rician)."""
        if self.model == "poisson":
            return rng.poisson(self.level * x) / self.level - x
        if self.model == "gamma":
            return x * (rng.gamma(self.level, 1.0 / self.gamma_rate, size=x.shape) - 1.0)
        return self.level * rng.standard_normal(x.shape)

    def _noise(self, x: np.ndarray, rng: np.random.Generator, spatial_axes: tuple[int, ...]) -> np.ndarray:
        """Draws the model's noise, spatially correlated when correlation_sigma > 0."""
        n1 = self._iid_noise(x, rng)
        if self.correlation_sigma == 0:
            return n1
        n2 = self._iid_noise(x, rng)
        return (_blur_keep_power(n1, self.correlation_sigma, spatial_axes) + n2) / np.sqrt(2.0)

    def __call__(self, img, image_id: str):
        """Noises ``img`` with the realisation fixed by ``(seed, image_id)``.

        Args:
            img: numpy array, torch Tensor or MetaTensor in [0, 1], shaped (H, W) or channel-first
                (C, H, W[, D]); with ndim >= 3 the first axis is channels and is not blurred over.
            image_id: stable id of the image; the same id and seed always give the same noise.

        Returns:
            The noisy image, float32, of the input's type and device; MetaTensor metadata is kept.

        Raises:
            ValueError: ``img`` has fewer than 2 dims, or is negative with the Poisson model.
        """
        x = convert_data_type(img, np.ndarray, dtype=np.float64)[0]
        if x.ndim < 2:
            raise ValueError(f"image shape {x.shape} has no spatial axes; expected (H, W) or (C, H, W[, D])")
        if self.model == "poisson" and x.size and x.min() < 0:
            raise ValueError(
                f"model 'poisson' needs a non-negative image (Poisson(lam * x)), got min {x.min():.4g}; "
                "normalise the image to [0, 1] first"
            )
        spatial_axes = tuple(range(x.ndim)) if x.ndim == 2 else tuple(range(1, x.ndim))
        rng = realisation_rng(self.seed, image_id)
        if self.model == "rician":
            noisy = np.hypot(x + self._noise(x, rng, spatial_axes), self._noise(x, rng, spatial_axes))
        else:
            noisy = x + self._noise(x, rng, spatial_axes)
        if self.clip:
            noisy = np.clip(noisy, 0.0, 1.0)
        return convert_to_dst_type(noisy, img, dtype=np.float32)[0]


class SyntheticNoised(MapTransform):
    """Dictionary twin of ``SyntheticNoise``: noises ``keys`` using the image id in ``d[id_key]``.

    With several keys, key ``k`` uses id ``f"{id}/{k}"`` so each key gets independent noise; with one
    key the id is used as is, so ``SyntheticNoised("image")`` matches ``SyntheticNoise`` on ``d["id"]``.

    Example::

        import numpy as np
        from diffdenoise.noise import SyntheticNoised

        noise = SyntheticNoised("image", model="gamma", level=100.0, correlation_sigma=1.2, seed=0)
        item = noise({"image": np.full((1, 32, 32), 0.5), "id": "case-007"})
        assert item["image"].dtype == np.float32

    Args:
        keys: keys of the images to noise.
        model, level, correlation_sigma, seed, gamma_rate, clip: as in ``SyntheticNoise``.
        id_key: key of the image id in each data dict.
        allow_missing_keys: skip absent ``keys`` instead of raising.

    Raises:
        KeyError: a data dict has no ``id_key`` entry.
    """

    backend = SyntheticNoise.backend

    def __init__(
        self,
        keys: KeysCollection,
        model: str = "gaussian",
        level: float = 6 / 255,
        correlation_sigma: float = 0.0,
        seed: int = 0,
        id_key: str = "id",
        gamma_rate: float | None = None,
        clip: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.noise = SyntheticNoise(model, level, correlation_sigma, seed, gamma_rate, clip)
        self.id_key = id_key

    def __call__(self, data):
        d = dict(data)
        if self.id_key not in d:
            raise KeyError(
                f"SyntheticNoised needs the image id in d[{self.id_key!r}] (id_key) to fix its noise; "
                f"the data has keys {sorted(map(str, d))}. Add an id to each datalist item or set id_key."
            )
        image_id = d[self.id_key]
        for key in self.key_iterator(d):
            d[key] = self.noise(d[key], f"{image_id}/{key}" if len(self.keys) > 1 else f"{image_id}")
        return d
