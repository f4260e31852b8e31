"""Scoring denoised slices against clean references: PSNR and SSIM per slice, on the [0, 1] range.

Clean references exist only for synthetic noise; they score results and never train a self-supervised
stage. The metrics are MONAI's (``PSNRMetric``, ``SSIMMetric``) with data range 1, no clipping of the
prediction, as in the paper's tables.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from diffdenoise.data import load_datalist

_psnr = PSNRMetric(max_val=1.0, reduction="none")
_ssim = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")


def _as_batch(image) -> torch.Tensor:
    """(H, W) array or tensor -> (1, 1, H, W) float32 tensor."""
    return torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]


def psnr(pred, reference) -> float:
    """PSNR in dB of one 2D slice, data range 1."""
    return float(_psnr(_as_batch(pred), _as_batch(reference)).item())


def ssim(pred, reference) -> float:
    """SSIM of one 2D slice (Gaussian window 11, sigma 1.5), data range 1."""
    return float(_ssim(_as_batch(pred), _as_batch(reference)).item())


def noise_leak(output, noisy, reference) -> float:
    """Pearson correlation of (output - reference) with (noisy - reference), arrays or tensors.

    The standing diagnostic of the diffusion stage: with ``reference`` = x_c it asks whether the output
    regenerates the input's own noise (near 1) instead of removing it (near 0); with the clean image it
    measures the same against the true noise.
    """
    a, b = _residuals(output, noisy, reference)
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b) + 1e-20))


def input_shrinkage(output, noisy, reference) -> tuple[float, np.ndarray]:
    """The slope a of (output - reference) on (noisy - reference), least squares, and reference + a (noisy - reference).

    The leak's counterfactual: the image an output would be if it only kept the fraction a of the input's residual.
    An output scoring above it adds detail beyond copying the input; one scoring below adds error.
    """
    a, b = _residuals(output, noisy, reference)
    slope = float(a @ b / (b @ b + 1e-20))
    reference = np.asarray(reference, dtype=np.float64)
    return slope, reference + slope * (np.asarray(noisy, dtype=np.float64) - reference)


def _residuals(output, noisy, reference) -> tuple[np.ndarray, np.ndarray]:
    """(output - reference) and (noisy - reference), flat and in float64: what both leak measures compare."""
    output, noisy, reference = (np.asarray(v, dtype=np.float64).ravel() for v in (output, noisy, reference))
    return output - reference, noisy - reference


def score_datalist(
    datalist_path: str | os.PathLike, keys: Sequence[str], split: str = "test", reference: str = "clean"
) -> dict[str, dict[str, np.ndarray]]:
    """PSNR and SSIM of each ``key``'s slices against ``reference`` over one split.

    Returns:
        ``{key: {"psnr": array (N,), "ssim": array (N,)}}`` in datalist order, so methods pair per slice.

    Raises:
        ValueError: when the split has no ``reference`` (real noise has no clean slices to score against).
    """
    items = load_datalist(datalist_path, split)
    if not items or reference not in items[0]:
        raise ValueError(f"{datalist_path}: split '{split}' has no '{reference}' slices to score against")
    scores = {k: {"psnr": [], "ssim": []} for k in keys}
    for item in items:
        ref = np.load(item[reference])
        for k in keys:
            pred = np.load(item[k])
            scores[k]["psnr"].append(psnr(pred, ref))
            scores[k]["ssim"].append(ssim(pred, ref))
    return {k: {m: np.asarray(v) for m, v in s.items()} for k, s in scores.items()}
