"""Noise models of paper Sec. 4.1 on real images: statistics, correlation, fixed realisations, types."""

import numpy as np
import pydicom
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from scipy.ndimage import gaussian_filter1d
from skimage.io import imread
from skimage.metrics import peak_signal_noise_ratio

from diffdenoise.noise import NOISE_MODELS, PAPER_LEVELS, SyntheticNoise, SyntheticNoised, realisation_rng

SIGMA = PAPER_LEVELS["mri"]["gaussian"]


@pytest.fixture(scope="module")
def mri(shared_data):
    """A studyforrest T1 axial slice, (1, 384, 274) in [0, 1] (max-normalised, about 160 grey levels)."""
    slice_ = pydicom.dcmread(shared_data / "brain_mri_t1_axial_studyforrest/series/N2D_0190.dcm").pixel_array
    return (slice_ / slice_.max())[None].astype(np.float64)


@pytest.fixture(scope="module")
def xray(shared_data):
    """A chest X-ray, (1, 599, 640) in [0, 1] (8-bit, max-normalised)."""
    png = imread(shared_data / "chest_xray_mhh/png/006f3a8a.png")
    return (png / png.max())[None].astype(np.float64)


def lag1_autocorrelation(n: np.ndarray) -> float:
    """Mean of the lag-1 autocorrelations of noise along the last two (spatial) axes."""
    n = n - n.mean()
    power = np.sum(n**2)
    return 0.5 * (np.sum(n[..., 1:, :] * n[..., :-1, :]) + np.sum(n[..., 1:] * n[..., :-1])) / power


def test_gaussian_std_and_psnr(mri):
    noisy = SyntheticNoise("gaussian", SIGMA)(mri, "N2D_0190")
    assert np.std(noisy - mri) == pytest.approx(SIGMA, rel=0.02)
    # Unclipped noisy PSNR of the paper's Gaussian level: 20 log10(255 / 6) = 32.57 dB.
    psnr = peak_signal_noise_ratio(mri, noisy.astype(np.float64), data_range=1.0)
    assert psnr == pytest.approx(32.57, abs=0.1)


@pytest.mark.parametrize("lam", [PAPER_LEVELS["mri"]["poisson"], PAPER_LEVELS["xray"]["poisson"]])
def test_poisson_variance_tracks_x_over_lam(xray, lam):
    n = SyntheticNoise("poisson", lam)(xray, "006f3a8a") - xray
    levels, inverse, counts = np.unique(xray, return_inverse=True, return_counts=True)
    variance = np.bincount(inverse.ravel(), n.ravel() ** 2) / counts  # per grey level; E[n] = 0
    keep = counts >= 500
    slope, intercept = np.polyfit(levels[keep], variance[keep], 1, w=np.sqrt(counts[keep]))
    assert slope * lam == pytest.approx(1.0, abs=0.03)
    assert abs(intercept * lam) < 0.01


@pytest.mark.parametrize("alpha, beta", [(100.0, None), (500.0, None), (100.0, 50.0)])
def test_gamma_factor_mean_and_variance(mri, alpha, beta):
    noisy = SyntheticNoise("gamma", alpha, gamma_rate=beta)(mri, "N2D_0190")
    beta = alpha if beta is None else beta
    bright = mri > 0.05
    g = noisy[bright] / mri[bright]
    assert g.mean() == pytest.approx(alpha / beta, rel=0.01)
    assert g.var() == pytest.approx(alpha / beta**2, rel=0.03)


@pytest.mark.parametrize("model", ["gaussian", "poisson", "gamma"])
def test_correlated_noise_keeps_power_and_grows_correlation(mri, model):
    level = PAPER_LEVELS["mri"][model]
    noise = {s: SyntheticNoise(model, level, correlation_sigma=s)(mri, "N2D_0190") for s in (0, 0.5, 1.2)}
    noise = {s: noisy - mri for s, noisy in noise.items()}
    power_iid = np.mean(noise[0] ** 2)
    assert np.mean(noise[0.5] ** 2) == pytest.approx(power_iid, rel=0.03)
    assert np.mean(noise[1.2] ** 2) == pytest.approx(power_iid, rel=0.03)
    rho = {s: lag1_autocorrelation(n) for s, n in noise.items()}
    assert abs(rho[0]) < 0.02
    assert 0.05 < rho[0.5] < rho[1.2] - 0.1


@pytest.mark.parametrize("correlation_sigma", [0.5, 1.2])
def test_correlated_gaussian_lag1_matches_kernel(mri, correlation_sigma):
    # n = (blur(n1) + n2) / sqrt(2) with equal powers: lag-1 autocorrelation is half the kernel's.
    kernel = gaussian_filter1d(np.eye(1, 41, 20).ravel(), correlation_sigma, mode="constant")
    expected = 0.5 * np.sum(kernel[1:] * kernel[:-1]) / np.sum(kernel**2)
    noise = SyntheticNoise("gaussian", SIGMA, correlation_sigma=correlation_sigma)(mri, "N2D_0190") - mri
    assert lag1_autocorrelation(noise) == pytest.approx(expected, abs=0.02)


def test_channels_are_not_blurred_together(mri):
    noise = SyntheticNoise("gaussian", SIGMA, correlation_sigma=1.2)(np.concatenate([mri, mri]), "two") - mri
    assert abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]) < 0.02


@pytest.mark.parametrize("correlation_sigma", [0.0, 1.2])
def test_rician_on_zero_image_is_rayleigh(correlation_sigma):
    rician = SyntheticNoise("rician", SIGMA, correlation_sigma=correlation_sigma)
    noisy = rician(np.zeros((1, 256, 256)), "zero")
    assert noisy.min() >= 0
    assert noisy.mean() == pytest.approx(SIGMA * np.sqrt(np.pi / 2), rel=0.02)


def test_clip_is_off_by_default(mri):
    assert SyntheticNoise("gaussian", SIGMA)(mri, "N2D_0190").min() < 0
    clipped = SyntheticNoise("gaussian", SIGMA, clip=True)(mri, "N2D_0190")
    assert clipped.min() == 0 and clipped.max() == 1


@pytest.mark.parametrize("model", NOISE_MODELS)
def test_realisation_is_fixed_by_seed_and_id(mri, model):
    def noisy(seed, image_id):
        noise = SyntheticNoise(model, PAPER_LEVELS["mri"][model], correlation_sigma=0.5, seed=seed)
        return noise(mri, image_id)

    first = noisy(0, "a")
    assert np.array_equal(first, noisy(0, "a"))
    assert not np.array_equal(first, noisy(0, "b"))
    assert not np.array_equal(first, noisy(1, "a"))


def test_realisation_golden_values():
    # The seed is SHA-256 of (seed, id), not hash(): these numbers hold in any process or machine.
    draws = realisation_rng(0, "case-000").standard_normal(2)
    assert draws == pytest.approx([-0.3623749, -1.2974600], abs=1e-6)
    noisy = SyntheticNoise("gaussian", 0.1, correlation_sigma=0.5)(np.zeros((4, 4)), "case-000")
    assert noisy[0, :2] == pytest.approx([-0.1027487, -0.0345469], abs=1e-6)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_workers_give_identical_noise(mri, num_workers):
    images = [mri[:, 80 + 48 * i : 144 + 48 * i, 100:164] for i in range(4)]  # inside the head
    data = [{"image": image, "cond": image, "id": f"N2D_0190/{i}"} for i, image in enumerate(images)]
    transform = SyntheticNoised(["image", "cond"], model="poisson", level=200.0, correlation_sigma=1.2)
    loader = DataLoader(Dataset(data, transform), batch_size=2, num_workers=num_workers)
    batches = list(loader)
    array_twin = SyntheticNoise("poisson", 200.0, correlation_sigma=1.2)
    for i, image in enumerate(images):
        item = {key: batches[i // 2][key][i % 2].numpy() for key in ("image", "cond")}
        assert np.array_equal(item["image"], array_twin(image, f"N2D_0190/{i}/image"))
        assert np.array_equal(item["cond"], array_twin(image, f"N2D_0190/{i}/cond"))
        assert not np.array_equal(item["image"], item["cond"])


def test_dict_twin_with_one_key_uses_the_id_as_is(mri):
    item = SyntheticNoised("image", model="gamma", level=100.0)({"image": mri, "id": "N2D_0190"})
    assert np.array_equal(item["image"], SyntheticNoise("gamma", 100.0)(mri, "N2D_0190"))


def test_dict_twin_allows_missing_keys(mri):
    item = SyntheticNoised(["image", "label"], allow_missing_keys=True)({"image": mri, "id": "N2D_0190"})
    assert np.array_equal(item["image"], SyntheticNoise()(mri, "N2D_0190/image"))


@pytest.mark.parametrize(
    "to_type, shape",
    [
        (np.asarray, (16, 16)),
        (np.asarray, (8, 16, 16)),
        (torch.as_tensor, (8, 16, 16)),
        (lambda a: MetaTensor(a, affine=torch.diag(torch.tensor([0.7, 0.7, 0.7, 1.0]))), (8, 8, 8, 8)),
    ],
)
def test_types_shapes_and_metadata(mri, to_type, shape):
    clean = np.resize(mri[0, 150:, 100:], shape)  # real intensities, any shape
    img = to_type(clean)
    out = SyntheticNoise("rician", SIGMA, correlation_sigma=0.5)(img, "typed")
    assert type(out) is type(img)
    assert out.shape == img.shape
    assert out.dtype in (np.float32, torch.float32)
    expected = SyntheticNoise("rician", SIGMA, correlation_sigma=0.5)(clean, "typed")
    np.testing.assert_array_equal(np.asarray(out), expected)
    if isinstance(img, MetaTensor):
        assert torch.equal(out.affine, img.affine)
        assert out.pixdim.tolist() == pytest.approx([0.7, 0.7, 0.7])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model": "gauss"}, "model 'gauss' is not one of gaussian, poisson, gamma, rician"),
        ({"level": -0.1}, "level -0.1 .* sigma and must be >= 0"),
        ({"model": "poisson", "level": 0.0}, "lam and must be > 0"),
        ({"model": "gamma", "level": float("nan")}, "alpha and must be > 0"),
        ({"correlation_sigma": -1.0}, "correlation_sigma -1.0 must be >= 0"),
        ({"model": "gamma", "level": 100.0, "gamma_rate": 0.0}, "gamma_rate 0.0 must be > 0"),
        ({"gamma_rate": 100.0}, "gamma_rate is only used by model 'gamma'"),
        ({"seed": 0.5}, "seed 0.5 must be an integer"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticNoise(**kwargs)
    with pytest.raises(ValueError, match=match):
        SyntheticNoised("image", **kwargs)


def test_bad_inputs_are_named(mri):
    with pytest.raises(ValueError, match="'poisson' needs a non-negative image"):
        SyntheticNoise("poisson", 200.0)(mri - 0.1, "N2D_0190")
    with pytest.raises(ValueError, match=r"image shape \(16,\) has no spatial axes"):
        SyntheticNoise()(np.zeros(16), "flat")
    with pytest.raises(KeyError, match="id_key"):
        SyntheticNoised("image")({"image": mri})
