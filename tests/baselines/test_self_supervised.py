"""Noise2Self and Neighbor2Neighbor trained on noisy real MRI only: they denoise a held-out slice, are seeded,
and the J-invariant Noise2Self output never depends on a pixel's own value."""

from functools import partial

import numpy as np
import pydicom
import pytest
import torch

from diffdenoise.baselines import (
    denoise_neighbor2neighbor,
    denoise_noise2self,
    train_neighbor2neighbor,
    train_noise2self,
)
from diffdenoise.metrics import psnr

SIGMA = 15 / 255
TINY = (8, 8, 16, 32, 64, 8)
FAST = {"patch_size": 32, "batch_size": 8, "lr": 2e-3, "features": TINY}  # lr 4-7x the defaults: 300 steps only
TRAINERS = {"noise2self": train_noise2self, "neighbor2neighbor": train_neighbor2neighbor}


def _slice(shared_data, number: int) -> np.ndarray:
    path = shared_data / "brain_mri_t1_axial_studyforrest" / "series" / f"N2D_{number:04d}.dcm"
    image = pydicom.dcmread(path).pixel_array.astype(np.float32)
    return image / image.max()


def _noisy(clean: np.ndarray, seed: int) -> np.ndarray:
    return clean + np.random.default_rng(seed).normal(0, SIGMA, clean.shape).astype(np.float32)


@pytest.fixture(scope="module")
def train_images(shared_data):
    """Noisy slices 170-177, cropped to two different sizes; the held-out slice 190 is 13 slices away."""
    crops = {0: np.s_[64:320, 16:258], 1: np.s_[64:288, 16:226]}  # 256x242 and 224x210
    return [_noisy(_slice(shared_data, k), k)[crops[k % 2]] for k in range(170, 178)]


@pytest.fixture(scope="module")
def held_out(shared_data):
    clean = _slice(shared_data, 190)[160:288, 73:201]
    return clean, _noisy(clean, 190)


@pytest.fixture(scope="module")
def noise2self_net(train_images):
    return train_noise2self(train_images, 300, **FAST)


@pytest.fixture(scope="module")
def neighbor2neighbor_net(train_images):
    return train_neighbor2neighbor(train_images, 300, **FAST)


# Measured (seed 0, noisy 24.57 dB): Noise2Self 27.48 (J-invariant 26.80), Neighbor2Neighbor 28.50, +-0.1 dB
# across thread counts; over training seeds 0-2 the smallest gains were +2.3, +1.7 and +3.3 dB.
@pytest.mark.parametrize(
    "network, denoise, min_gain_db",
    [
        ("noise2self_net", denoise_noise2self, 1.5),
        ("noise2self_net", partial(denoise_noise2self, j_invariant=True), 1.0),
        ("neighbor2neighbor_net", denoise_neighbor2neighbor, 2.0),
    ],
    ids=["noise2self", "noise2self_j_invariant", "neighbor2neighbor"],
)
def test_beats_noisy_psnr(request, held_out, network, denoise, min_gain_db):
    clean, noisy = held_out
    out = denoise(request.getfixturevalue(network), noisy)
    assert out.shape == noisy.shape and out.dtype == np.float32
    gain = psnr(out, clean) - psnr(noisy, clean)
    assert gain >= min_gain_db, f"{network} gains only {gain:.2f} dB"


@pytest.mark.parametrize("name", list(TRAINERS))
def test_seed_repeatable(train_images, name):
    runs = [TRAINERS[name](train_images, 3, seed=seed, **FAST).state_dict() for seed in (5, 5, 6)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]), "same seed, different weights"
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0]), "seed is ignored"


def test_callback_sees_every_step(train_images):
    steps = []
    train_neighbor2neighbor(train_images, 2, callback=steps.append, **FAST)
    assert [s["iteration"] for s in steps] == [0, 1] and all(np.isfinite(s["loss"]) for s in steps)


# Interior, bottom/right border of a size that is not a multiple of 16, and the corner.
@pytest.mark.parametrize("pixel", [(20, 17), (39, 44), (0, 0)])
def test_j_invariant_ignores_own_pixel(noise2self_net, held_out, pixel):
    noisy = held_out[1][:40, :45]
    changed = noisy.copy()
    changed[pixel] += 0.5
    j_invariant = [denoise_noise2self(noise2self_net, x, j_invariant=True)[pixel] for x in (noisy, changed)]
    plain = [denoise_noise2self(noise2self_net, x)[pixel] for x in (noisy, changed)]
    assert j_invariant[0] == j_invariant[1]
    assert plain[0] != plain[1], "the plain forward pass should see the pixel (else this test proves nothing)"


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("noise2self", {"patch_size": 40}, "patch_size 40 is not a multiple of 16"),
        ("neighbor2neighbor", {"patch_size": 48}, "patch_size 48 is not a multiple of 32"),
        ("noise2self", {"patch_size": 512}, "patch_size"),
        ("noise2self", {"grid": 1}, "grid"),
        ("neighbor2neighbor", {"gamma": -1.0}, "gamma"),
        ("noise2self", {"iterations": 0}, "iterations"),
        ("neighbor2neighbor", {"batch_size": 0}, "batch_size"),
        ("noise2self", {"lr": 0.0}, "lr"),
        ("neighbor2neighbor", {"features": (8, 8, 8)}, "features"),
        ("noise2self", {"images": []}, "images"),
        ("noise2self", {"images": np.zeros((64, 64), np.float32)}, r"\[image\]"),
    ],
)
def test_rejects_bad_knobs(name, kwargs, match):
    args = {"images": [np.zeros((64, 64), np.float32)], "iterations": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        TRAINERS[name](**args)
