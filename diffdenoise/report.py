"""Human-readable results: a markdown table of mean +- sd scores and a before/after figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def score_table(scores: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, str] | None = None) -> str:
    """Markdown table, one row per method: PSNR and SSIM as mean +- sd over slices, and the slice count."""
    labels = labels or {}
    rows = ["| method | PSNR (dB) | SSIM | slices |", "|---|---|---|---|"]
    for key, s in scores.items():
        p, q = s["psnr"], s["ssim"]
        rows.append(
            f"| {labels.get(key, key)} | {p.mean():.2f} +- {p.std():.2f} | {q.mean():.4f} +- {q.std():.4f} | {len(p)} |"
        )
    return "\n".join(rows)


def save_comparison_figure(
    images: Sequence[np.ndarray], titles: Sequence[str], path: str | os.PathLike, zoom: float = 0.35
) -> Path:
    """One row of images (each a full view above a zoomed centre crop), on the same [0, 1] grey scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.4), squeeze=False)
    for col, (image, title) in enumerate(zip(images, titles)):
        h, w = image.shape
        ch, cw = max(int(h * zoom) // 2, 4), max(int(w * zoom) // 2, 4)
        crop = image[h // 2 - ch: h // 2 + ch, w // 2 - cw: w // 2 + cw]
        for row, view in enumerate((image, crop)):
            axes[row, col].imshow(view, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            axes[row, col].axis("off")
        axes[0, col].set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
