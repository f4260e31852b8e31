"""Neighbor2Neighbor baseline: a U-Net trained on pairs of neighbour sub-images of each noisy slice.

Paper: Huang et al., "Neighbor2Neighbor: Self-supervised denoising from single noisy images" (CVPR 2021),
and its reference code's ``generate_mask_pair``. In every 2x2 cell (pixels numbered
``0 1 / 2 3``) draw one of the 8 ordered pairs of 4-neighbours; the first pixels form sub-image
``g1(y)``, the second ``g2(y)``, both ``(H/2, W/2)``. Noise of neighbours is independent while their
clean values nearly agree, so ``g2(y)`` is a noisy target for ``f(g1(y))``. The paper's loss

    ||f(g1 y) - g2 y||^2 + gamma_t ||f(g1 y) - g2 y - (g1 f(y) - g2 f(y))||^2

adds a regulariser for the gap between the neighbours' clean values, with ``f(y)`` the full-size output
computed without gradient and ``gamma_t`` ramping linearly from 0 to ``gamma`` (the paper's 2) over the
iterations. Inference is one plain forward pass on the full slice.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet

from diffdenoise.baselines import _unet
from diffdenoise.convergence import TrainingCurve

__all__ = ["denoise_neighbor2neighbor", "train_neighbor2neighbor"]

# Ordered neighbour pairs inside a 2x2 cell numbered 0 1 / 2 3 (the reference code's ``idx_pair``).
_PAIRS = torch.tensor([[0, 1], [0, 2], [1, 3], [3, 2], [1, 0], [2, 0], [3, 1], [2, 3]])


def _subimage(x: torch.Tensor, cell_index: torch.Tensor) -> torch.Tensor:
    """Pick pixel ``cell_index[b, 0, i, j]`` of each 2x2 cell of ``(B, 1, H, W)``: ``(B, 1, H/2, W/2)``."""
    return F.pixel_unshuffle(x, 2).gather(1, cell_index)


def _neighbour_loss(gamma: float) -> _unet.LossFn:
    def loss(network: torch.nn.Module, batch: torch.Tensor, done: float, generator: torch.Generator) -> torch.Tensor:
        cells = (batch.shape[0], 1, batch.shape[2] // 2, batch.shape[3] // 2)
        pairs = _PAIRS[torch.randint(len(_PAIRS), cells, generator=generator)].to(batch.device)
        g1, g2 = pairs[..., 0], pairs[..., 1]
        with torch.no_grad():
            full = network(batch)
        residual = network(_subimage(batch, g1)) - _subimage(batch, g2)
        gap = _subimage(full, g1) - _subimage(full, g2)
        return residual.square().mean() + gamma * done * (residual - gap).square().mean()

    return loss


def train_neighbor2neighbor(
    images: Sequence[np.ndarray],
    iterations: int,
    patch_size: int = 64,
    batch_size: int = 8,
    lr: float = 3e-4,
    features: Sequence[int] = _unet.DEFAULT_FEATURES,
    gamma: float = 2.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    validation: Sequence[np.ndarray] | None = None,
    val_interval: int = 100,
    curve: TrainingCurve | None = None,
) -> BasicUNet:
    """Train a Neighbor2Neighbor U-Net on noisy slices only.

    Args:
        images: noisy 2D slices ``(H, W)``, float in [0, 1], sizes may differ; both sides >= ``patch_size``.
        iterations: number of Adam steps; ``gamma_t`` reaches ``gamma`` at the last one.
        patch_size: side of the square random crops, a multiple of 32 (the U-Net halves the half-size
            sub-images 4 times).
        batch_size: crops per step.
        lr: Adam learning rate (the paper's 3e-4).
        features: the 6 ``BasicUNet`` widths (5 encoder levels, last decoder); smaller is faster.
        gamma: final weight of the regulariser (the paper's 2); 0 trains with the plain neighbour loss.
        seed: fixes weights, crops and neighbour pairs: the same seed gives the same network on the same device.
        device: torch device to train on.
        progress: show a tqdm bar.
        callback: called after each step with ``{"iteration": int, "loss": float}``.
        validation: held-out noisy slices; with ``curve``, the loss on fixed crops of them is recorded every
            ``val_interval`` steps and training stops when the curve's rule says converged (``iterations`` the cap).
        val_interval: steps between validations.
        curve: a ``diffdenoise.convergence.TrainingCurve`` that records the validation history, or None.

    Returns:
        The trained ``BasicUNet`` in eval mode, on ``device``; use it with ``denoise_neighbor2neighbor``.

    Raises:
        ValueError: a knob out of range or an unusable image; the message names the knob to change.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> noisy = [np.clip(0.5 + rng.normal(0, 0.06, (96, 80)), 0, 1).astype(np.float32) for _ in range(2)]
        >>> net = train_neighbor2neighbor(noisy, iterations=2, patch_size=32, features=(4, 4, 4, 4, 4, 4))
        >>> denoise_neighbor2neighbor(net, noisy[0]).shape
        (96, 80)
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise ValueError(f"gamma must be a number >= 0, got {gamma!r}. Set `gamma` to e.g. 2.0 (the paper's).")
    return _unet.fit(
        images,
        iterations,
        _neighbour_loss(float(gamma)),
        patch_size=patch_size,
        patch_multiple=2 * _unet.DOWNSAMPLING,
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
        desc="Neighbor2Neighbor",
    )


def denoise_neighbor2neighbor(network: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Denoise one slice ``(H, W)`` of any size with a ``train_neighbor2neighbor`` network; float32 out."""
    return _unet.to_image(_unet.predict(network, _unet.image_tensor(image, network)))
