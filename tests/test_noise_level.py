"""Patch-PCA noise level estimation: known levels on synthetic images, a real slice, and the error paths."""

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import gaussian_filter

from diffdenoise.data import normalise
from diffdenoise.errors import InputError
from diffdenoise.noise import SyntheticNoise
from diffdenoise.noise_level import (
    correlated_patch_covariance,
    estimate_from_datalist,
    estimate_gaussian_sigma,
    estimate_noise_level,
)

SIGMA = 6 / 255


def clean_image(seed: int, size: int = 160) -> np.ndarray:
    """A smooth random field plus stripes and a disk whose edges have a 1-pixel blur (a PSF), in [0.15, 1]."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.standard_normal((size, size)), size / 16)
    field = (field - field.min()) / (field.max() - field.min())
    yy, xx = np.mgrid[:size, :size]
    stripes = (xx + 0.5 * yy) % (size // 2) < size // 4
    disk = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 4) ** 2
    return 0.15 + 0.5 * field + gaussian_filter(0.25 * stripes + 0.15 * disk, 1.0)


def noisy_images(model: str, level: float, correlation_sigma: float = 0.0, count: int = 3) -> list[np.ndarray]:
    noise = SyntheticNoise(model, level, correlation_sigma, seed=0)
    return [noise(clean_image(k), image_id=str(k)) for k in range(count)]


@pytest.mark.parametrize("correlation_sigma", [0.5, 1.2])
def test_correlated_covariance_matches_the_noise_transform(correlation_sigma):
    noise = SyntheticNoise("gaussian", 1.0, correlation_sigma, seed=0)(np.zeros((300, 300)), image_id="c")
    patches = sliding_window_view(noise, (7, 7))[::2, ::2].reshape(-1, 49)
    measured = np.cov(patches.T)
    np.testing.assert_allclose(correlated_patch_covariance(correlation_sigma), measured, atol=0.03)
    assert np.array_equal(correlated_patch_covariance(0.0), np.eye(49))


@pytest.mark.parametrize("correlation_sigma", [0.0, 0.5, 1.2])
def test_gaussian_sigma_within_5_percent(correlation_sigma):
    for noisy in noisy_images("gaussian", SIGMA, correlation_sigma):
        assert estimate_gaussian_sigma(noisy, correlation_sigma) == pytest.approx(SIGMA, rel=0.05)


def test_constant_padding_is_left_out():
    noisy = noisy_images("gaussian", SIGMA, count=1)[0]
    padded = np.pad(noisy, 60)  # a zero frame as large as the image: its patches hold no noise
    assert estimate_gaussian_sigma(padded) == pytest.approx(SIGMA, rel=0.05)


@pytest.mark.parametrize(
    "model, level, correlation_sigma, rel",
    [
        ("gaussian", SIGMA, 1.2, 0.05),
        ("rician", SIGMA, 0.0, 0.05),
        ("rician", SIGMA, 1.2, 0.05),
        ("poisson", 200.0, 0.0, 0.10),
        ("poisson", 700.0, 0.0, 0.10),
        ("gamma", 100.0, 0.0, 0.10),
        ("gamma", 500.0, 0.0, 0.10),
    ],
)
def test_dataset_level(model, level, correlation_sigma, rel):
    estimate = estimate_noise_level(noisy_images(model, level, correlation_sigma), model, correlation_sigma)
    assert estimate == pytest.approx(level, rel=rel)


def test_rician_background_is_not_read_as_noise():
    clean = clean_image(0)
    clean[:, :60] = 0.0  # Rayleigh background: its spread is 0.65 sigma, not sigma
    noisy = SyntheticNoise("rician", SIGMA, seed=0)(clean, image_id="r")
    assert estimate_noise_level([noisy], "rician") == pytest.approx(SIGMA, rel=0.05)


def test_real_slice_reads_its_own_noise_plus_the_synthetic(shared_data):
    """A real 'clean' slice has noise and fine detail of its own; the estimate is the total."""
    path = shared_data / "brain_mri_t1_axial_studyforrest" / "series" / "N2D_0190.dcm"
    clean = normalise(pydicom.dcmread(path).pixel_array.astype(np.float32), "mri").astype(np.float64)
    noisy = SyntheticNoise("gaussian", SIGMA, seed=0)(clean, image_id="real")
    own = estimate_gaussian_sigma(clean + 1e-9 * np.random.default_rng(0).standard_normal(clean.shape))
    assert estimate_gaussian_sigma(noisy) == pytest.approx(np.hypot(SIGMA, own), rel=0.05)
    assert estimate_gaussian_sigma(noisy) > 1.2 * SIGMA  # the reference's own share is large here


def write_datalist(root: Path, images: list[np.ndarray], split: str = "training") -> Path:
    items = []
    for k, image in enumerate(images):
        np.save(root / f"{k}.npy", image.astype(np.float32))
        items.append({"image": f"{k}.npy", "id": str(k)})
    lists = {"training": [], "validation": [], "test": []}
    lists[split] = items
    (root / "datalist.json").write_text(json.dumps(lists))
    return root / "datalist.json"


def test_from_datalist(tmp_path):
    datalist = write_datalist(tmp_path, noisy_images("gaussian", SIGMA, 0.5))
    assert estimate_from_datalist(datalist, "gaussian", 0.5, max_slices=2) == pytest.approx(SIGMA, rel=0.05)


def test_from_datalist_without_slices(tmp_path):
    datalist = write_datalist(tmp_path, noisy_images("gaussian", SIGMA, count=1), split="test")
    with pytest.raises(InputError, match="split 'training' has no slices"):
        estimate_from_datalist(datalist, "gaussian")


@pytest.mark.parametrize(
    "model, correlation_sigma, match",
    [
        ("speckle", 0.0, "not one of gaussian, poisson, gamma, rician"),
        ("poisson", 0.5, r"correlated poisson .* set `noise_level` in the config"),
        ("gamma", 1.2, r"correlated gamma .* set `noise_level` in the config"),
        ("gaussian", -1.0, "correlation_sigma -1.0 must be >= 0"),
    ],
)
def test_bad_arguments(model, correlation_sigma, match):
    with pytest.raises(ValueError, match=match):
        estimate_noise_level(noisy_images("gaussian", SIGMA, count=1), model, correlation_sigma)


def test_bad_images():
    with pytest.raises(ValueError, match="no images"):
        estimate_noise_level([], "gaussian")
    with pytest.raises(ValueError, match=r"not 2-D \(H, W\)"):
        estimate_gaussian_sigma(np.zeros((2, 32, 32)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        estimate_gaussian_sigma(np.full((32, 32), np.nan))
    with pytest.raises(ValueError, match="fewer than 490"):
        estimate_gaussian_sigma(np.random.default_rng(0).random((20, 20)))
    with pytest.raises(ValueError, match="no slice has enough usable patches"):
        estimate_noise_level([np.random.default_rng(0).random((20, 20))], "gaussian")
