"""Plumbing shared by the self-supervised U-Net baselines: network, random crops, training loop, inference.

Noise2Self and Neighbor2Neighbor differ only in their loss, so everything else lives here once: MONAI's
``BasicUNet`` (1 -> 1 channels, 2D, no normalisation layers: instance norm would discard each patch's
intensity level, which a denoiser must keep; the Neighbor2Neighbor U-Net has none either), random crops
with the 8 flips/rotations, the seeded Adam loop with tqdm (stopped by ``diffdenoise.convergence``'s plateau rule on
the method's own loss over held-out noisy crops, when given them), and pad-to-16 inference.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from tqdm import tqdm

from diffdenoise.convergence import TrainingCurve

DEFAULT_FEATURES = (16, 16, 32, 64, 128, 16)
DOWNSAMPLING = 16  # BasicUNet halves the image 4 times

# loss(network, batch (B, 1, P, P), fraction of training done in [0, 1], torch generator) -> scalar loss
LossFn = Callable[[torch.nn.Module, torch.Tensor, float, torch.Generator], torch.Tensor]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, fix: str) -> None:
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}. {fix}")


def _check_training(images, iterations, patch_size, patch_multiple, batch_size, lr, features) -> list[np.ndarray]:
    """Validate the knobs both trainers share; return the images as float32 arrays."""
    _check_int("iterations", iterations, 1, "Set `iterations` to the number of Adam steps, e.g. 2000.")
    _check_int("batch_size", batch_size, 1, "Set `batch_size` to e.g. 8.")
    _check_int("patch_size", patch_size, patch_multiple, f"Set `patch_size` to e.g. {4 * patch_multiple}.")
    if patch_size % patch_multiple:
        raise ValueError(
            f"patch_size {patch_size} is not a multiple of {patch_multiple}, which this trainer's U-Net input "
            f"needs. Set `patch_size` to e.g. {patch_multiple * max(1, round(patch_size / patch_multiple))}."
        )
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive learning rate, got {lr!r}. Set `lr` to e.g. 5e-4.")
    if len(features) != 6 or not all(_is_int(f) and f >= 1 for f in features):
        raise ValueError(
            f"features must be 6 positive integers (BasicUNet: 5 encoder levels and the last decoder), "
            f"got {features!r}. Set `features` to e.g. {DEFAULT_FEATURES}."
        )
    if isinstance(images, np.ndarray) and images.ndim == 2:
        raise ValueError("images must be a list of 2D slices, got one 2D array. Pass `[image]`.")
    if len(images) == 0:
        raise ValueError("images is empty: pass a list of noisy 2D slices (H, W) to train on.")
    arrays = [np.asarray(image, dtype=np.float32) for image in images]
    for index, image in enumerate(arrays):
        if image.ndim != 2 or min(image.shape) < patch_size:
            raise ValueError(
                f"images[{index}] has shape {image.shape}, but every image must be 2D (H, W) with both sides "
                f">= patch_size {patch_size}. Lower `patch_size` or drop the small image."
            )
        if not np.isfinite(image).all():
            raise ValueError(f"images[{index}] contains NaN or inf values; clean or drop it.")
    return arrays


def build_unet(features: Sequence[int], seed: int) -> BasicUNet:
    """The 2D 1 -> 1 channel BasicUNet, weights drawn from ``seed`` without touching the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=tuple(map(int, features)), norm=None)


def random_crops(images: list[np.ndarray], patch_size: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """``(B, 1, P, P)`` crops, each flipped/rotated by one of the 8 symmetries of the square.

    Images are drawn in proportion to their area, so every pixel is equally likely whatever the sizes.
    """
    areas = np.array([image.size for image in images], dtype=np.float64)
    batch = np.empty((batch_size, 1, patch_size, patch_size), dtype=np.float32)
    for b, index in enumerate(rng.choice(len(images), size=batch_size, p=areas / areas.sum())):
        image = images[index]
        top = rng.integers(image.shape[0] - patch_size + 1)
        left = rng.integers(image.shape[1] - patch_size + 1)
        crop = np.rot90(image[top : top + patch_size, left : left + patch_size], k=rng.integers(4))
        batch[b, 0] = crop[:, ::-1] if rng.integers(2) else crop
    return batch


def fit(
    images,
    iterations: int,
    loss_fn: LossFn,
    *,
    patch_size: int,
    patch_multiple: int,
    batch_size: int,
    lr: float,
    features: Sequence[int],
    seed: int,
    device: str | torch.device,
    progress: bool,
    callback: Callable[[dict], None] | None,
    desc: str,
    validation=None,
    val_interval: int = 100,
    curve: TrainingCurve | None = None,
) -> BasicUNet:
    """Train a fresh BasicUNet on random crops of ``images`` with Adam, minimising ``loss_fn``.

    ``seed`` fixes the weights (torch), the crops (numpy) and the loss's own draws (a torch generator
    handed to ``loss_fn``), so a seed gives the same network on the same device. With held-out ``validation``
    slices and a ``curve``, every ``val_interval`` steps ``loss_fn`` on fixed crops of them (``validation_loss``)
    is added to ``curve``, and training stops when its rule says converged; ``iterations`` is the cap.
    Returns the network in eval mode.
    """
    arrays = _check_training(images, iterations, patch_size, patch_multiple, batch_size, lr, features)
    _check_int("seed", seed, 0, "Set `seed` to e.g. 0.")
    if (validation is None) != (curve is None):
        raise ValueError("validation slices and a curve go together: pass both (to train to convergence) or neither")
    if curve is not None:
        _check_int("val_interval", val_interval, 1, "Set `val_interval` to the steps between validations, e.g. 100.")
        held_out = _check_training(validation, iterations, patch_size, patch_multiple, batch_size, lr, features)
        val_crops = torch.from_numpy(random_crops(held_out, patch_size, 4 * batch_size, np.random.default_rng(seed)))
        curve.cap = iterations
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    network = build_unet(features, seed).to(device).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    for step in tqdm(range(iterations), desc=desc, disable=not progress):
        batch = torch.from_numpy(random_crops(arrays, patch_size, batch_size, rng)).to(device)
        loss = loss_fn(network, batch, step / max(iterations - 1, 1), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if callback is not None:
            callback({"iteration": step, "loss": loss.item()})
        if curve is not None and (step + 1) % val_interval == 0:
            if curve.add(step + 1, validation_loss(network, val_crops.to(device), loss_fn, batch_size, seed)):
                break
    if curve is not None:
        curve.steps_run = step + 1
    return network.eval()


def validation_loss(network: torch.nn.Module, crops: torch.Tensor, loss_fn: LossFn, batch_size: int,
                    seed: int) -> float:
    """``loss_fn`` on fixed held-out crops, in batches, with the loss's draws (masks, pairs) seeded the same each
    time, so successive values differ only by the network; at training progress 0 (Neighbor2Neighbor's plain
    neighbour loss), the objective whose plateau says the denoiser stopped improving."""
    generator = torch.Generator().manual_seed(seed)
    network.eval()
    with torch.no_grad():
        losses = [loss_fn(network, crops[i:i + batch_size], 0.0, generator).item() * len(crops[i:i + batch_size])
                  for i in range(0, len(crops), batch_size)]
    network.train()
    return sum(losses) / len(crops)


def image_tensor(image, network: torch.nn.Module) -> torch.Tensor:
    """One 2D slice as a ``(1, 1, H, W)`` tensor on the network's device and dtype."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be one 2D slice (H, W), got shape {image.shape}. Denoise slice by slice.")
    parameter = next(network.parameters())
    return torch.as_tensor(image, dtype=parameter.dtype, device=parameter.device)[None, None]


def predict(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``network(x)`` for ``(B, 1, H, W)`` of any size: replicate-pad bottom/right to a multiple of 16, crop back."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (0, -width % DOWNSAMPLING, 0, -height % DOWNSAMPLING), mode="replicate")
    with torch.no_grad():
        return network(padded)[..., :height, :width]


def to_image(x: torch.Tensor) -> np.ndarray:
    """``(1, 1, H, W)`` tensor -> ``(H, W)`` float32 array."""
    return x[0, 0].detach().cpu().numpy().astype(np.float32, copy=False)
