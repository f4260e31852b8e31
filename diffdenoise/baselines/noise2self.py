"""Noise2Self baseline: J-invariant masked training of a U-Net on noisy slices only.

Paper: Batson and Royer, "Noise2Self: Blind denoising by self-supervision" (ICML 2019), and its reference code's
``Masker(mode="interpolate")``. The partition J is a ``grid x grid`` lattice; phase ``k`` masks the
pixels ``(i, j)`` with ``i % grid == k // grid`` and ``j % grid == k % grid``. Each masked pixel is replaced
by the weighted mean of its 8 neighbours (kernel ``[[.5, 1, .5], [1, 0, 1], [.5, 1, .5]] / 6``, itself
excluded), and the loss is the MSE on the masked pixels only: the network never sees a target pixel in
its input, so it cannot learn the identity, and with independent noise the minimiser is E[x | rest].

Inference: a plain forward pass (the paper's practical choice), or ``j_invariant=True``: for each phase
mask, predict, keep the masked pixels, so each output pixel comes from an input that hid it: an exactly
J-invariant denoiser, the form the paper's theory (and its self-supervised loss) is stated for.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet

from diffdenoise.baselines import _unet
from diffdenoise.convergence import TrainingCurve

__all__ = ["denoise_noise2self", "train_noise2self"]


def _check_grid(grid) -> None:
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(
            f"grid must be an integer >= 2, got {grid!r}: with grid 1 every pixel is masked and the 3x3 "
            "neighbour mean would read other masked pixels. Set `grid` to e.g. 4 (Noise2Self's default)."
        )


def _phase_mask(shape: Sequence[int], phase: int, grid: int, device: torch.device) -> torch.Tensor:
    """``(H, W)`` bool mask of the lattice pixels of ``phase`` in ``[0, grid**2)``."""
    rows = torch.arange(shape[0], device=device) % grid == phase // grid
    cols = torch.arange(shape[1], device=device) % grid == phase % grid
    return rows[:, None] & cols[None, :]


def _mask_input(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace the masked pixels of ``(B, 1, H, W)`` by the mean of their 8 neighbours, never themselves.

    Reflect padding (not replicate) at the border, so a border pixel's mean reads no copy of itself.
    """
    kernel = torch.tensor([[0.5, 1.0, 0.5], [1.0, 0.0, 1.0], [0.5, 1.0, 0.5]], dtype=x.dtype, device=x.device)
    neighbours = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), (kernel / kernel.sum())[None, None])
    return torch.where(mask, neighbours, x)


def _masked_loss(grid: int) -> _unet.LossFn:
    def loss(network: torch.nn.Module, batch: torch.Tensor, _: float, generator: torch.Generator) -> torch.Tensor:
        phase = int(torch.randint(grid * grid, (1,), generator=generator))
        mask = _phase_mask(batch.shape[-2:], phase, grid, batch.device)
        return F.mse_loss(network(_mask_input(batch, mask))[..., mask], batch[..., mask])

    return loss


def train_noise2self(
    images: Sequence[np.ndarray],
    iterations: int,
    patch_size: int = 64,
    batch_size: int = 8,
    lr: float = 5e-4,
    features: Sequence[int] = _unet.DEFAULT_FEATURES,
    grid: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    validation: Sequence[np.ndarray] | None = None,
    val_interval: int = 100,
    curve: TrainingCurve | None = None,
) -> BasicUNet:
    """Train a Noise2Self U-Net on noisy slices only; each step masks one random phase of the grid.

    Args:
        images: noisy 2D slices ``(H, W)``, float in [0, 1], sizes may differ; both sides >= ``patch_size``.
        iterations: number of Adam steps.
        patch_size: side of the square random crops, a multiple of 16 (the U-Net halves it 4 times).
        batch_size: crops per step.
        lr: Adam learning rate.
        features: the 6 ``BasicUNet`` widths (5 encoder levels, last decoder); smaller is faster.
        grid: lattice period; a step masks ``1 / grid**2`` of the pixels.
        seed: fixes weights, crops and phases: the same seed gives the same network on the same device.
        device: torch device to train on.
        progress: show a tqdm bar.
        callback: called after each step with ``{"iteration": int, "loss": float}``.
        validation: held-out noisy slices; with ``curve``, the loss on fixed crops of them is recorded every
            ``val_interval`` steps and training stops when the curve's rule says converged (``iterations`` the cap).
        val_interval: steps between validations.
        curve: a ``diffdenoise.convergence.TrainingCurve`` that records the validation history, or None.

    Returns:
        The trained ``BasicUNet`` in eval mode, on ``device``; use it with ``denoise_noise2self``.

    Raises:
        ValueError: a knob out of range or an unusable image; the message names the knob to change.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> noisy = [np.clip(0.5 + rng.normal(0, 0.06, (96, 80)), 0, 1).astype(np.float32) for _ in range(2)]
        >>> net = train_noise2self(noisy, iterations=2, patch_size=32, features=(4, 4, 4, 4, 4, 4))
        >>> denoise_noise2self(net, noisy[0], j_invariant=True).shape
        (96, 80)
    """
    _check_grid(grid)
    return _unet.fit(
        images,
        iterations,
        _masked_loss(grid),
        patch_size=patch_size,
        patch_multiple=_unet.DOWNSAMPLING,
        batch_size=batch_size,
        lr=lr,
        features=features,
        seed=seed,
        device=device,
        progress=progress,
        callback=callback,
        validation=validation,
        val_interval=val_interval,
        curve=curve,
        desc="Noise2Self",
    )


def denoise_noise2self(
    network: torch.nn.Module, image: np.ndarray, j_invariant: bool = False, grid: int = 4
) -> np.ndarray:
    """Denoise one slice with a ``train_noise2self`` network.

    Args:
        network: the trained network.
        image: noisy slice ``(H, W)``, any size.
        j_invariant: if True, run one pass per grid phase (``grid**2`` passes) and keep each pass's masked
            pixels, so no output pixel depends on its own input value; otherwise one plain pass.
        grid: lattice period of the J-invariant passes; use the one the network was trained with.

    Returns:
        The denoised slice ``(H, W)``, float32.
    """
    x = _unet.image_tensor(image, network)
    if not j_invariant:
        return _unet.to_image(_unet.predict(network, x))
    _check_grid(grid)
    out = torch.empty_like(x)
    for phase in range(grid * grid):
        mask = _phase_mask(x.shape[-2:], phase, grid, x.device)
        out[..., mask] = _unet.predict(network, _mask_input(x, mask))[..., mask]
    return _unet.to_image(out)
