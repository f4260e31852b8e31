"""Shared fixtures: the real images in ../shared/data, skipped with a reason when absent, and a small trainer."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the project's real test images; tests that need it skip when it is not beside the repo."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real images not found at {SHARED_DATA} (clone the repo beside ../shared)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny convs: a second thread gains little, and OpenMP threads stall on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mri_slice(shared_data) -> torch.Tensor:
    """A studyforrest T1 axial slice, (1, 1, 384, 274), min-max scaled to [0, 1]."""
    path = shared_data / "brain_mri_t1_axial_studyforrest" / "series" / "N2D_0190.dcm"
    img = torch.from_numpy(pydicom.dcmread(path).pixel_array.astype(np.float32))
    return ((img - img.min()) / (img.max() - img.min()))[None, None]


@pytest.fixture
def psnr_gain_after_training():
    """Trains ``net`` on random 48x48 crops of (inputs, targets), then returns the PSNR gain of
    ``net(inputs)`` over ``inputs`` against ``clean`` on the whole image, in dB."""
    import torch.nn.functional as F

    from diffdenoise.metrics import psnr

    def train(net, optimizer, inputs, targets, clean, steps: int) -> float:
        g = torch.Generator().manual_seed(2)
        h, w = inputs.shape[-2:]
        for _ in range(steps):
            ys, xs = torch.randint(0, h - 47, (4,), generator=g), torch.randint(0, w - 47, (4,), generator=g)
            windows = [(..., slice(y, y + 48), slice(x, x + 48)) for y, x in zip(ys.tolist(), xs.tolist())]
            loss = F.mse_loss(net(torch.cat([inputs[i] for i in windows])), torch.cat([targets[i] for i in windows]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            denoised = net.eval()(inputs)
        return psnr(denoised[0, 0], clean[0, 0]) - psnr(inputs[0, 0], clean[0, 0])

    return train
