"""Human-readable results: markdown tables of mean +- sd scores (with paired tests) and comparison figures."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PairedBest:
    """The method with the highest mean score, and paired Wilcoxon p-values of it against each other method."""

    best: str
    p_values: dict[str, float]
    alpha: float = 0.05

    @property
    def significant(self) -> bool:
        """True when the best beats every other method at ``p < alpha`` (False with nothing to compare)."""
        return bool(self.p_values) and all(p < self.alpha for p in self.p_values.values())


def paired_best(scores: Mapping[str, np.ndarray], alpha: float = 0.05) -> PairedBest:
    """Finds the best method by mean and tests it against each other one, slice by slice.

    The test is the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) on per-slice score pairs:
    it needs no normality, and pairing removes the slice-to-slice spread that dwarfs method differences.
    With n slices the smallest possible p is 2 / 2**n, so fewer than 6 slices can never reach p < 0.05.
    Identical scores give p = 1.

    Args:
        scores: ``{method: per-slice scores (N,)}``, higher is better, the same slices in the same order.
        alpha: significance level.

    Returns:
        ``PairedBest`` with the best method and ``{other method: p}``.

    Example::

        import numpy as np
        from diffdenoise.report import paired_best

        base = np.linspace(28.0, 32.0, 10)
        result = paired_best({"bsn": base + 1.0, "noisy": base})
        assert result.best == "bsn" and result.significant  # p = 2 / 2**10
    """
    from scipy.stats import wilcoxon

    if not scores:
        raise ValueError("scores is empty: pass {method: per-slice scores} for at least one method")
    best = max(scores, key=lambda name: float(np.mean(scores[name])))
    p_values = {}
    for name, values in scores.items():
        if name == best:
            continue
        diff = np.asarray(scores[best], dtype=np.float64) - np.asarray(values, dtype=np.float64)
        p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
        p_values[name] = 1.0 if np.isnan(p) else p
    return PairedBest(best, p_values, alpha)


def _mean_sd(values: np.ndarray, digits: int) -> str:
    """``mean +- sd`` with the sample standard deviation (ddof 1; 0 for a single slice)."""
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{float(np.mean(values)):.{digits}f} +- {sd:.{digits}f}"


def significance_table(
    scores: Mapping[str, Mapping[str, np.ndarray]],
    labels: Mapping[str, str] | None = None,
    alpha: float = 0.05,
    extra_columns: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """Markdown table, one row per method: PSNR and SSIM as mean +- sd, each column's best marked by a paired test.

    The best mean of a column is **bold** when ``paired_best`` finds it above every other method at
    ``p < alpha``, else it carries "(n.s.)". The p columns give each method's p against that best.

    Args:
        scores: ``{method: {"psnr": (N,), "ssim": (N,)}}`` over the same slices, as ``score_datalist`` returns.
        labels: display names by method.
        alpha: significance level.
        extra_columns: ``{header: {method: cell}}`` appended on the right (e.g. timings).
    """
    labels, extra_columns = labels or {}, extra_columns or {}
    tests = {metric: paired_best({k: s[metric] for k, s in scores.items()}, alpha) for metric in ("psnr", "ssim")}
    header = ["method", "PSNR (dB)", "SSIM", "p vs best PSNR", "p vs best SSIM", "slices", *extra_columns]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, s in scores.items():
        cells = [labels.get(key, key)]
        for metric, digits in (("psnr", 2), ("ssim", 4)):
            cell, test = _mean_sd(s[metric], digits), tests[metric]
            if key == test.best:
                cell = f"**{cell}**" if test.significant else f"{cell} (n.s.)"
            cells.append(cell)
        for metric in ("psnr", "ssim"):
            test = tests[metric]
            cells.append("best" if key == test.best else f"{test.p_values[key]:.3g}")
        cells.append(str(len(s["psnr"])))
        cells += [column.get(key, "") for column in extra_columns.values()]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _detail_box(reference: np.ndarray, zoom: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the ``zoom``-sized window with the most edges in ``reference``.

    Only windows centred in the middle half of each axis compete, so burned-in labels and collimator
    borders at the image's edge (chest X-rays) do not win over anatomy.
    """
    from scipy.ndimage import sobel, uniform_filter

    h, w = reference.shape
    bh, bw = max(int(h * zoom), 8), max(int(w * zoom), 8)
    edges = uniform_filter(np.hypot(sobel(reference, 0), sobel(reference, 1)), size=(bh, bw), mode="constant")
    rows = slice(max(h // 4, bh // 2), min(3 * h // 4, h - (bh - bh // 2)) + 1)
    cols = slice(max(w // 4, bw // 2), min(3 * w // 4, w - (bw - bw // 2)) + 1)
    row, col = np.unravel_index(int(np.argmax(edges[rows, cols])), edges[rows, cols].shape)
    return int(rows.start + row - bh // 2), int(cols.start + col - bw // 2), bh, bw


def save_visual_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    reference: np.ndarray,
    path: str | os.PathLike,
    zoom: float = 0.3,
) -> Path:
    """A visual comparison like the paper's Fig. 3: one column per image, three rows.

    Rows: the full image in [0, 1] grey with the zoom box drawn; the zoomed region (the window of side
    ``zoom`` with the most edges in ``reference``, so detail loss shows); ``|image - reference|`` on one
    colour scale for all columns (0 to the 99th percentile of the first image's difference).

    Args:
        images: 2D slices of one shape, e.g. noisy, each method, clean.
        titles: one per image.
        reference: the slice the difference maps are taken against.
        path: PNG to write (folders are created).
        zoom: side of the zoomed window as a fraction of the image side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    reference = np.asarray(reference, dtype=np.float32)
    top, left, bh, bw = _detail_box(reference, zoom)
    diffs = [np.abs(np.asarray(image, dtype=np.float32) - reference) for image in images]
    vmax = max(float(np.percentile(diffs[0], 99)), 1e-6)
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(2.3 * n, 7.2), squeeze=False)
    for col, (image, title, diff) in enumerate(zip(images, titles, diffs)):
        crop = image[top : top + bh, left : left + bw]
        axes[0, col].imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[0, col].add_patch(Rectangle((left - 0.5, top - 0.5), bw, bh, fill=False, edgecolor="yellow", lw=1))
        axes[1, col].imshow(crop, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[2, col].imshow(diff, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        axes[0, col].set_title(title, fontsize=9)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    for row, label in enumerate(("image", "zoom", f"|x - ref|, 0-{vmax:.3f}")):
        axes[row, 0].set_ylabel(label, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_palette_png(fig, path)
    plt.close(fig)
    return path


def _save_palette_png(fig, path: Path) -> None:
    """Saves the figure as a 256-colour PNG: grey slices and one colour map fit a palette, and the file is about
    a third of matplotlib's RGBA one (1.5 MB -> 0.54 MB for a docs grid), small enough to commit."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, optimize=True)
