"""deepinv's losses as benchmark methods: skipped with one line without the peers' environment (always checked),
and, where scripts/baselines_env.sh made it, a few training steps through the method's own fit."""

import numpy as np
import pytest

from diffdenoise.benchmark import METHODS, Case, FitSettings
from diffdenoise.benchmark.methods.deepinv_peers import PYTHON_VARIABLE, peers_unavailable

PEERS = ("deepinv_r2r", "deepinv_n2n", "deepinv_sure")
TINY = {"iterations": 3, "patch_size": 32, "batch_size": 2, "features": [4, 4, 4, 4, 4, 4]}


@pytest.fixture
def peers_env():
    """The peers' environment, or a skip saying how to make it."""
    if reason := peers_unavailable():
        pytest.skip(reason)


def _settings(tmp_path, noise="gaussian", level=0.05):
    return FitSettings(Case("studyforrest", noise, level, 0.0, "down2"), tmp_path, "smoke", 0, TINY)


def _noisy(count=2, shape=(96, 80)):
    rng = np.random.default_rng(0)
    return [np.clip(0.5 + rng.normal(0, 0.05, shape), 0, 1).astype(np.float32) for _ in range(count)]


def test_without_the_environment_every_peer_is_skipped_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv(PYTHON_VARIABLE, str(tmp_path / "absent" / "python"))
    for name in PEERS:
        reason = METHODS[name].missing()
        assert reason and "\n" not in reason and "scripts/baselines_env.sh" in reason and PYTHON_VARIABLE in reason


@pytest.mark.parametrize("name", PEERS)
def test_a_few_deepinv_steps_denoise_to_the_input_shape(peers_env, name, tmp_path):
    denoise = METHODS[name].fit(_noisy(), tmp_path, _settings(tmp_path))
    for noisy in _noisy(2, (70, 90)):  # any size, several slices from one runner
        denoised = denoise(noisy)
        assert denoised.shape == noisy.shape and denoised.dtype == np.float32 and np.isfinite(denoised).all()
    assert (tmp_path / "training.json").is_file()


def test_a_loss_deepinv_lacks_fails_with_the_runners_reason(peers_env, tmp_path):
    with pytest.raises(RuntimeError, match="no SURE loss for 'gamma'"):
        METHODS["deepinv_sure"].fit(_noisy(), tmp_path, _settings(tmp_path, "gamma", 100.0))
