"""The leak-free stage 3: antithetic recorrupted Tweedie estimates, averaged (issue 16).

The diffusion network of the leak-free path (``diffdenoise.diffusion.RecorruptedDiffusionBatch``) is trained
at a recorruption strength rho (``diffdenoise.recorruption``) to output h(z) = E[x | z] for z = y + rho sigma
eps. Stage 3 then denoises y with one network forward per member, no DDIM trajectory:

    x_hat = (1 / 2K) sum_k [h(z(y, eps_k)) + h(z(y, -eps_k))]      (the mirror of each state for Poisson/Gamma)

Each pair cancels every odd-order term of the expansion of h in eps, which is what the paper's SRDS pair
(eq. 3-4) aims at; here the two members are two unbiased estimates of E[x | y]'s neighbourhood, not two DDIM
trajectories. Several rho may be averaged too.

The network's output, a preconditioned residual (k-diffusion/EDM style skip), in image units:

    h(z) = z - sigma_ref (rho + 1 / rho) f([sqrt(abar_t) z, c], t),   sqrt(abar_t) = 1 / sqrt(1 + rho^2),

where t is the schedule's timestep of rho and c the condition. For Gaussian noise z - y~ = sigma (rho + 1 / rho)
eps exactly, so f is the usual eps prediction and its target has unit scale. The condition c may depend on the
network input only: c = BSN(z), never BSN(y). BSN(y) at a pixel's neighbours carries that pixel's noise n, and
the target's noise n - (sigma / rho) eps shares n: a network seeing BSN(y) would learn to reproduce part of n,
the leak of the paper path (docs/results.md). A function of z adds no information about the target's noise.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, sliding_window_inference
from monai.utils import convert_to_dst_type, convert_to_tensor

from diffdenoise.recorruption import Recorruption, schedule_rho, timestep_for_rho

__all__ = ["recorrupted_x0", "RecorruptedX0Inferer", "AntitheticTweedieInferer", "pick_rho"]


def recorrupted_x0(network: Callable[..., torch.Tensor], z: torch.Tensor, timesteps: torch.Tensor, rho: torch.Tensor,
                   sigma_ref: float, condition: torch.Tensor | None = None) -> torch.Tensor:
    """h(z) of the module docstring for a batch: z (B, C, H, W) in image units, timesteps and rho (B,)."""
    rho = rho.to(z.dtype).reshape(-1, *[1] * (z.ndim - 1))
    state = z / (1.0 + rho**2).sqrt()
    inputs = state if condition is None else torch.cat([state, condition.to(z.dtype)], dim=1)
    return z - sigma_ref * (rho + 1.0 / rho) * network(inputs, timesteps=timesteps)


class RecorruptedX0Inferer(Inferer):
    """The stage-2 trainer's and evaluator's inferer: h(z), times the per-item ``loss_scale`` that
    ``RecorruptedDiffusionBatch`` also applied to the target, so a plain MSE is the weighted loss.

    Args:
        sigma_ref: the recorruption's ``sigma_ref``.
    """

    def __init__(self, sigma_ref: float):
        super().__init__()
        self.sigma_ref = float(sigma_ref)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, timesteps=None,
                 rho=None, condition=None, loss_scale=None, **kwargs: Any) -> torch.Tensor:
        h = recorrupted_x0(network, convert_to_tensor(inputs, track_meta=False), timesteps, rho, self.sigma_ref, condition)
        return h if loss_scale is None else h * loss_scale.reshape(-1, *[1] * (h.ndim - 1))


def windowed(network: Callable[..., torch.Tensor], roi_size: Sequence[int] | None,
             overlap: float = 0.25) -> Callable[..., torch.Tensor]:
    """``network(inputs, timesteps=t)`` run window by window (MONAI's sliding window, Gaussian-blended), or the
    network itself for ``roi_size`` None.

    The diffusion U-Net trains on crops, and its middle block always attends over all of its (H/4)(W/4) tokens:
    on a whole 640-pixel X-ray that is 28 000 tokens against 256 on a 64-pixel crop, so whole-slice inference costs
    the square of the pixel count and shows the attention a field it never saw in training. Windows of the
    training crop keep both as in training. Every item of a call must share one timestep (as in stage 3)."""
    if roi_size is None:
        return network

    def run(inputs: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if not bool((timesteps == timesteps[0]).all()):
            raise ValueError("a windowed network call needs one timestep for the whole batch")
        step = timesteps[:1]
        return sliding_window_inference(inputs, list(roi_size), len(inputs),
                                        lambda window: network(window, timesteps=step.expand(len(window))),
                                        overlap=overlap, mode="gaussian")

    return run


def _padded(y: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple]:
    """y reflect-padded so H and W are multiples of ``multiple``, and the index that crops a result back."""
    sizes = y.shape[2:]
    pads = [p for size in reversed(sizes) for p in (0, (-size) % multiple)]
    return (F.pad(y, pads, mode="reflect") if any(pads) else y), (..., *(slice(0, size) for size in sizes))


def _members(network, recorruption: Recorruption, y: torch.Tensor, states: list[torch.Tensor], timestep: int,
             rho: float, condition_fn: Callable | None, roi_size: Sequence[int] | None = None):
    """h, y~ and the repeated y for one recorruption per state of the (B, C, H, W) batch y, all in one forward."""
    batch = y.repeat(len(states), *[1] * (y.ndim - 1))
    rho_batch = torch.full((len(batch),), rho, dtype=torch.float64, device=y.device)
    with torch.no_grad():
        z, target = recorruption.split(batch, torch.cat(states), rho_batch)
        condition = None if condition_fn is None else condition_fn(z)
        t_batch = torch.full((len(batch),), timestep, dtype=torch.long, device=y.device)
        h = recorrupted_x0(windowed(network, roi_size), z, t_batch, rho_batch, recorruption.sigma_ref, condition)
        return h, target, batch


def _antithetic_states(recorruption: Recorruption, y: torch.Tensor, pairs: int, generator) -> list[torch.Tensor]:
    """``pairs`` draws for y, then their mirrors."""
    states = [recorruption.draw(y, generator) for _ in range(pairs)]
    return states + [recorruption.antithetic(s) for s in states]


class AntitheticTweedieInferer(Inferer):
    """Denoise y by averaging h over K antithetic pairs of recorruptions at one or several rho.

    Args:
        recorruption: the split the network was trained with (``diffdenoise.recorruption.make_recorruption``).
        scheduler: the network's noise schedule; each rho runs at its nearest timestep (and that timestep's rho).
        rho: the recorruption strength(s) to average over, e.g. 0.5 or [0.5, 1.0] (``pick_rho`` chooses one on
            the validation split).
        num_pairs: K; each pair is two forwards, run in one batch with the other pairs.
        seed: seed of the CPU generator of the draws; a call is repeatable.
        condition_fn: c = condition_fn(z) (the stage-1 BSN on each member), or None for an unconditioned net.
        pad_multiple: reflect-pad H, W to a multiple of this (a U-Net with L levels needs 2 ** (L - 1)).
        roi_size: run the network in windows of this size (``windowed``), e.g. its training crop; None: whole.

    Example (``DiffusionModelUNet`` needs ``einops``)::

        import torch
        from monai.networks.nets import DiffusionModelUNet
        from monai.networks.schedulers import DDIMScheduler
        from diffdenoise.inferers import AntitheticTweedieInferer
        from diffdenoise.recorruption import make_recorruption

        net = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8, 8),
                                 attention_levels=(False, False, False), num_res_blocks=1, norm_num_groups=8)
        inferer = AntitheticTweedieInferer(make_recorruption("gaussian", 6 / 255), DDIMScheduler(), rho=0.5,
                                           pad_multiple=4)
        denoised = inferer(torch.rand(1, 1, 30, 30), net.eval())  # (1, 1, 30, 30)
    """

    def __init__(self, recorruption: Recorruption, scheduler, rho: float | Sequence[float] = 0.5, num_pairs: int = 2,
                 seed: int = 0, condition_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 pad_multiple: int = 1, roi_size: Sequence[int] | None = None):
        super().__init__()
        rhos = [float(r) for r in (rho if isinstance(rho, Sequence) else [rho])]
        if not rhos or min(rhos) <= 0:
            raise ValueError(f"rho={rho!r} must be a positive number or a non-empty list of them, e.g. 0.5")
        if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
            raise ValueError(f"num_pairs={num_pairs!r} must be an integer >= 1 (each pair is two forwards)")
        if isinstance(pad_multiple, bool) or not isinstance(pad_multiple, int) or pad_multiple < 1:
            raise ValueError(f"pad_multiple={pad_multiple!r} must be an integer >= 1, e.g. 4 for a 3-level U-Net")
        table = schedule_rho(scheduler.alphas_cumprod)
        self.timesteps = [timestep_for_rho(scheduler.alphas_cumprod, r) for r in rhos]
        self.rhos = [float(table[t]) for t in self.timesteps]
        self.recorruption = recorruption
        self.num_pairs = num_pairs
        self.seed = int(seed)
        self.condition_fn = condition_fn
        self.pad_multiple = pad_multiple
        self.roi_size = None if roi_size is None else [int(s) for s in roi_size]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        """The average of h over 2 K members per rho; ``inputs`` (B, C, H, W) noisy, in [0, 1] image units.

        A ``condition`` keyword is refused: the condition must be computed from each member (module docstring).
        """
        if kwargs.get("condition") is not None:
            raise ValueError("the leak-free inferer computes its condition from each recorrupted member "
                             "(condition_fn); do not pass `condition` (BSN(y) would leak y's noise)")
        y, crop = _padded(convert_to_tensor(inputs, track_meta=False), self.pad_multiple)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        total = torch.zeros_like(y)
        for t, rho in zip(self.timesteps, self.rhos):
            states = _antithetic_states(self.recorruption, y, self.num_pairs, generator)
            h, _, _ = _members(network, self.recorruption, y, states, t, rho, self.condition_fn, self.roi_size)
            total += h.reshape(len(states), *y.shape).mean(dim=0)
        return convert_to_dst_type((total / len(self.rhos))[crop], inputs)[0]


def pick_rho(network: Callable[..., torch.Tensor], recorruption: Recorruption, scheduler,
             slices: Callable[[], Sequence[Any]], candidates: Sequence[float], condition_fn: Callable | None = None,
             draws: int = 4, seed: int = 0, pad_multiple: int = 1, device: str | torch.device = "cpu",
             cache: str | os.PathLike | None = None, roi_size: Sequence[int] | None = None) -> float:
    """The candidate rho with the lowest estimated MSE of a single recorrupted estimate h(z), on noisy slices only.

    E||h(z) - y~||^2 = MSE(h(z), x) + E||y~ - x||^2, because y~'s noise is independent of z with mean zero; the
    second term is ``recorruption.target_noise_variance``. So the loss minus that term estimates the MSE
    without a clean image. Each slice gets ``draws`` recorruptions (antithetic pairs: each member is a valid
    draw). With ``cache`` (a JSON path) the result is stored with a hash of the network's weights, the noise
    model and these options, and read back while they match: a bundle's stage 3 chooses once and
    ``diffdenoise denoise`` reuses the choice without the slices.

    Args:
        slices: returns the 2-D noisy slices (numpy or torch), e.g. the validation split; called only when no
            cached choice matches.
        candidates: rho values to compare.
        roi_size: the windows of stage 3's network calls (``windowed``), so the choice is made as stage 3 runs.

    Returns:
        The chosen rho (the schedule's value at its nearest timestep).
    """
    table = schedule_rho(scheduler.alphas_cumprod)
    options = sorted({timestep_for_rho(scheduler.alphas_cumprod, r) for r in candidates})
    roi_size = None if roi_size is None else [int(s) for s in roi_size]
    key = _fingerprint(network, recorruption, options if roi_size is None else [options, roi_size], draws, seed)
    if cache is not None and Path(cache).is_file():
        stored = json.loads(Path(cache).read_text())
        if stored.get("key") == key:
            return float(stored["rho"])
    images = [torch.as_tensor(image, dtype=torch.float32, device=device) for image in slices()]
    estimates = {}
    for t in options:
        rho, generator, losses = float(table[t]), torch.Generator(device="cpu").manual_seed(seed), []
        for image in images:
            y, crop = _padded(image.reshape(1, 1, *image.shape[-2:]), pad_multiple)
            states = _antithetic_states(recorruption, y, max(1, draws // 2), generator)
            h, target, batch = _members(network, recorruption, y, states, t, rho, condition_fn, roi_size)
            rho_batch = torch.full((len(batch),), rho, dtype=torch.float64, device=y.device)
            noise = recorruption.target_noise_variance(batch, rho_batch)[crop].mean()
            losses.append(float(((h - target)[crop] ** 2).mean() - noise))
        estimates[rho] = sum(losses) / len(losses)
    best = min(estimates, key=estimates.get)
    if cache is not None:
        tmp = Path(f"{cache}.tmp")
        tmp.write_text(json.dumps({"key": key, "rho": best, "estimated_mse": {str(r): e for r, e in estimates.items()}},
                                  indent=1))
        tmp.replace(cache)
    return best


def _fingerprint(network, recorruption: Recorruption, options, draws: int, seed: int) -> str:
    """What a stored choice of rho depends on: the weights, the noise model and level, and the trial."""
    digest = hashlib.sha256()
    for tensor in network.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps([type(recorruption).__name__, recorruption.level,
                              getattr(recorruption, "correlation_sigma", 0.0), options, draws, seed]).encode())
    return digest.hexdigest()
