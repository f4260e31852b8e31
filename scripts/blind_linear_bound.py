"""How well can ANY predictor that never sees a pixel do on these slices? The best linear one, measured.

Fits, by least squares on the training slices of a prepared dataset, the linear filter that predicts each
pixel from its (2r+1)^2 neighbourhood without the pixel itself (plus a constant), and scores it on the test
split against the clean slices: once fitted noisy -> noisy (what a blind-spot net can learn), once clean ->
clean (the blind predictability of the clean image itself). A BSN near the first number is not undertrained;
one far below the noisy input's PSNR at the second number cannot gain by being blind.

Usage: python scripts/blind_linear_bound.py DATASET_DIR [--radius 3]
"""

from __future__ import annotations

import fire
import numpy as np

from diffdenoise.data import load_datalist
from diffdenoise.metrics import psnr


def neighbours(image: np.ndarray, radius: int) -> np.ndarray:
    """(H*W, (2r+1)^2) matrix of each pixel's neighbours, the pixel itself left out, plus a ones column."""
    h, w = image.shape
    padded = np.pad(image, radius)
    columns = [padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w].ravel()
               for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if (dy, dx) != (0, 0)]
    return np.stack(columns + [np.ones(h * w)], axis=1)


def main(dataset: str, radius: int = 3):
    """Prints the test PSNR of the blind linear predictor fitted on noisy and on clean training slices."""
    train, test = load_datalist(f"{dataset}/datalist.json", "training"), load_datalist(f"{dataset}/datalist.json", "test")
    for source in ("image", "clean"):
        slices = [np.load(item[source]).astype(np.float64) for item in train]
        weights = np.linalg.lstsq(np.concatenate([neighbours(s, radius) for s in slices]),
                                  np.concatenate([s.ravel() for s in slices]), rcond=None)[0]
        scores = []
        for item in test:
            x, clean = np.load(item[source]).astype(np.float64), np.load(item["clean"])
            scores.append(psnr((neighbours(x, radius) @ weights).reshape(x.shape), clean))
        print(f"blind linear {2 * radius + 1}x{2 * radius + 1} fitted {source} -> {source}: {np.mean(scores):.2f} dB")


if __name__ == "__main__":
    fire.Fire(main)
