"""Relative error of diffdenoise.noise_level on real slices with the project's synthetic noise.

Usage: OMP_NUM_THREADS=1 python scripts/noise_level_errors.py [--data ../shared/data] [--slices 16]

Clean slices: studyforrest T1 brain MRI and the Hannover chest X-rays, normalised as ``prepare``
does, full size and 2x2-mean downsampled. Noise: ``SyntheticNoise(model, level, corr, seed=0)``.
Columns: ``est``: median over slices / true - 1. ``clean``: the same estimator on the clean slices
alone (Gaussian: dithered by 1e-9, so the zero background counts as data as it does once noised),
as a share of the level's noise variance: the real noise and fine detail the reference brings
(Gaussian sigma_c^2 / sigma^2, Poisson lambda / lambda_c, Gamma trigamma(alpha_c) / trigamma(alpha)).
``vs total``: est against the level whose variance adds that share (sigma sqrt(1 + clean),
lambda / (1 + clean), trigamma^-1(trigamma(alpha) (1 + clean))). ``skimage``: its
``estimate_sigma`` (wavelet MAD), median / true - 1, Gaussian cases.
"""

import argparse
from pathlib import Path

import numpy as np
from scipy.special import polygamma
from skimage.restoration import estimate_sigma

from diffdenoise.data import _area_downsample, is_background, normalise
from diffdenoise.io import scan_volumes
from diffdenoise.noise import PAPER_LEVELS, SyntheticNoise
from diffdenoise.noise_level import _inverse_trigamma, estimate_noise_level

CASES = [("gaussian", 0.0), ("gaussian", 1.2), ("gaussian", 0.5), ("poisson", 0.0), ("gamma", 0.0)]


def load(data: Path, slices: int) -> dict[str, list[np.ndarray]]:
    """Clean slices per dataset: evenly spaced foreground MRI slices, the first X-rays; full and /2."""
    mri = scan_volumes(data / "brain_mri_t1_axial_studyforrest" / "series")[0].read()
    mri = normalise(mri.array, "mri")
    mri = mri[[k for k in range(len(mri)) if not is_background(mri[k])]]
    mri = mri[np.linspace(0, len(mri) - 1, slices).round().astype(int)]
    xray = [normalise(s.read().array, "xray")[0] for s in scan_volumes(data / "chest_xray_mhh" / "png")[:slices]]
    return {
        "mri": list(mri),
        "mri/2": list(_area_downsample(mri, 2)),
        "xray": xray,
        "xray/2": [_area_downsample(x[None], 2)[0] for x in xray],
    }


def clean_share(model: str, level: float, clean_estimate: float) -> float:
    """Variance the clean reference reads as, relative to the level's own noise variance."""
    if model == "gaussian":
        return (clean_estimate / level) ** 2
    if model == "poisson":
        return level / clean_estimate
    return float(polygamma(1, clean_estimate) / polygamma(1, level))


def total_level(model: str, level: float, share: float) -> float:
    """The level whose noise variance is the synthetic one plus the clean reference's."""
    if model == "gaussian":
        return level * np.sqrt(1 + share)
    if model == "poisson":
        return level / (1 + share)
    return _inverse_trigamma(float(polygamma(1, level)) * (1 + share))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--slices", type=int, default=16)
    args = parser.parse_args()
    print(f"{'data':7} {'model':9} {'corr':>4} {'level':>8} {'est':>7} {'clean':>6} {'vs total':>8} {'skimage':>8}")
    for name, clean in load(args.data, args.slices).items():
        modality = name.split("/")[0]
        for model, corr in CASES:
            level = PAPER_LEVELS[modality][model]
            noise = SyntheticNoise(model, level, corr, seed=0)
            noisy = [noise(x, image_id=f"{name}/{k}") for k, x in enumerate(clean)]
            est = estimate_noise_level(noisy, model, corr)
            share = clean_share(model, level, _clean_estimate(clean, model, corr))
            skim = f"{np.median([estimate_sigma(y) for y in noisy]) / level - 1:+.1%}" if model == "gaussian" else "-"
            print(
                f"{name:7} {model:9} {corr:4.1f} {level:8.4g} {est / level - 1:+7.1%} {share:6.2f} "
                f"{est / total_level(model, level, share) - 1:+8.1%} {skim:>8}"
            )


def _clean_estimate(clean: list[np.ndarray], model: str, corr: float) -> float:
    """The estimator on clean slices; for Gaussian a plateau-free copy (tiny dither), so the zero
    background counts as data as it does once noised (Poisson and Gamma keep zeros at 0)."""
    rng = np.random.default_rng(0)
    dithered = [x + 1e-9 * rng.standard_normal(x.shape) for x in clean] if model == "gaussian" else clean
    try:
        return estimate_noise_level(dithered, model, corr)
    except ValueError:
        return np.inf if model != "gaussian" else 0.0


if __name__ == "__main__":
    main()
