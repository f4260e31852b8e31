"""The in-house Neighbor2Neighbor loss against deepinv's on the same batch, network and neighbour pairs.

Why: trained scores of one method differ by up to a dB between training seeds (docs/benchmark.md, "Peers' own
implementations"), too much to tell two implementations apart by training them. Given the same pair draws the
two losses must agree to float precision, value and gradient; this checks that on real noisy crops. deepinv
draws its masks from the global torch generator with its own pair table, so its ``generate_mask_pair`` is handed
the masks of the in-house draw here.

Run with the peers' environment's python: .venv-baselines/bin/python scripts/peers_loss_check.py DATASET_DIR
(a prepared case, e.g. runs/peers_crosscheck/studyforrest-gaussian-down2/data).
"""

from __future__ import annotations

import deepinv
import fire
import numpy as np
import torch

from diffdenoise.baselines import _unet
from diffdenoise.baselines.neighbor2neighbor import _PAIRS, _neighbour_loss
from diffdenoise.data import load_datalist


def _deepinv_masks(pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """deepinv's flat masks (cell-major, 4 pixels a 2x2 cell) selecting the pixels of ``pairs[..., 0 | 1]``."""
    first = torch.arange(0, pairs[..., 0].numel() * 4, 4)
    masks = []
    for side in (0, 1):
        mask = torch.zeros(pairs[..., 0].numel() * 4, dtype=torch.bool)
        mask[first + pairs[..., side].reshape(-1)] = True
        masks.append(mask)
    return masks[0], masks[1]


def main(dataset: str, seed: int = 0, batch_size: int = 8, patch_size: int = 64, gamma: float = 2.0):
    """Prints both losses, and the largest gradient difference, at the start, middle and end of the gamma ramp."""
    images = [np.load(item["image"]) for item in load_datalist(f"{dataset}/datalist.json", "training")]
    batch = torch.from_numpy(_unet.random_crops(images, patch_size, batch_size, np.random.default_rng(seed)))
    network = _unet.build_unet((8, 8, 16, 32, 64, 8), seed)
    cells = (batch.shape[0], 1, patch_size // 2, patch_size // 2)
    theirs = deepinv.loss.Neighbor2Neighbor(gamma=gamma)
    for done in (0.0, 0.5, 1.0):
        pairs = _PAIRS[torch.randint(len(_PAIRS), cells, generator=torch.Generator().manual_seed(seed))]
        theirs.generate_mask_pair = lambda img: _deepinv_masks(pairs)
        theirs.gamma = gamma * done
        grads, values = [], []
        for compute in (lambda: _neighbour_loss(gamma)(network, batch, done, torch.Generator().manual_seed(seed)),
                        lambda: theirs(y=batch, physics=deepinv.physics.Denoising(), model=lambda y, _: network(y))):
            network.zero_grad()
            value = compute()
            value.backward()
            values.append(value.item())
            grads.append(torch.cat([p.grad.reshape(-1) for p in network.parameters()]))
        gap = (grads[0] - grads[1]).abs().max().item() / grads[0].abs().max().item()
        print(f"gamma_t {gamma * done:.1f}: in-house {values[0]:.8f}, deepinv {values[1]:.8f}, "
              f"relative gap {abs(values[0] - values[1]) / values[0]:.1e}; largest gradient gap {gap:.1e} of the largest")


if __name__ == "__main__":
    fire.Fire(main)
