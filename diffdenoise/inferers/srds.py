"""Stabilized reverse diffusion sampling (SRDS): deterministic DDIM from eps and -eps, averaged.

Paper: DiffDenoise (Demir et al.), Sec. 3.3-3.5. DDIM: Song et al., arXiv:2010.02502, eq. 12 with eta = 0.

Symbols, paper -> code:
    x' (noisy image)                          -> ``inputs``
    x_c (BSN output, the condition)           -> ``condition``
    r = x' - x_c (Sec. 3.2)                   -> the diffused variable when ``target="residual"``
                                                 (divided by ``residual_scale``)
    alpha_t of eq. 1 (a cumulative product)   -> ``alpha_bar_t`` = ᾱ_t = ``scheduler.alphas_cumprod[t]``
    X_t = sqrt(ᾱ_t) X + sqrt(1 - ᾱ_t) eps     -> eq. 1, the start state when ``start_timestep`` is set
    f_theta(X_t, c, t), predicts eps          -> ``network(cat([x_t, condition], 1), timesteps=t)``
    x̂^eps, x̂^-eps (eq. 3)                    -> the members of one batched DDIM run
    x̂ = (x̂^eps + x̂^-eps) / 2 (eq. 4)         -> the returned mean

Why it works (DESIGN.md): with eta = 0 the DDIM map eps -> x0 is deterministic and smooth,
x0(eps) ~ m + J eps, so averaging eps and -eps cancels the first-order term; independent samples would not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler
from monai.networks.schedulers.ddpm import DDPMPredictionType
from monai.utils import convert_to_dst_type
from tqdm import tqdm

__all__ = ["SRDSInferer", "SRDSTarget"]


class SRDSTarget(str, Enum):
    """What the diffusion model was trained to diffuse (paper Sec. 3.2 proposes the residual)."""

    RESIDUAL = "residual"
    IMAGE = "image"


def to_diffused(image: torch.Tensor, condition: torch.Tensor, target: str, residual_scale: float) -> torch.Tensor:
    """The variable the diffusion model learns and samples: r = (x' - x_c) / s (Sec. 3.2), or x' itself."""
    return (image - condition) / residual_scale if SRDSTarget(target) is SRDSTarget.RESIDUAL else image


def to_image(diffused: torch.Tensor, condition: torch.Tensor, target: str, residual_scale: float) -> torch.Tensor:
    """Inverse of ``to_diffused``: x_c + s r, or the image itself."""
    return condition + residual_scale * diffused if SRDSTarget(target) is SRDSTarget.RESIDUAL else diffused


def _ddim_update(
    x_t: torch.Tensor,
    eps_hat: torch.Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    clip_x0: tuple[float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step (eta = 0), the only copy of the update math.

    x0_hat = (x_t - sqrt(1 - ᾱ_t) eps_hat) / sqrt(ᾱ_t),
    x_prev = sqrt(ᾱ_prev) x0_hat + sqrt(1 - ᾱ_prev) eps_hat (DDIM eq. 12).

    Returns:
        ``(x_prev, x0_hat)``.
    """
    x0_hat = (x_t - (1.0 - alpha_bar_t) ** 0.5 * eps_hat) / alpha_bar_t**0.5
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(*clip_x0)
    return alpha_bar_prev**0.5 * x0_hat + (1.0 - alpha_bar_prev) ** 0.5 * eps_hat, x0_hat


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop MetaTensor metadata so batch repeats and network calls see a plain tensor."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _check_shapes(inputs: torch.Tensor, **others: torch.Tensor) -> None:
    """Fail early with the offending name: a broadcast would silently mix batch items or channels."""
    for name, value in others.items():
        if value.shape != inputs.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but inputs have {tuple(inputs.shape)}; SRDS needs them "
                f"equal, (B, C, H, W[, D])."
            )


class SRDSInferer(Inferer):
    """Denoise x' by averaging deterministic DDIM samples started from eps and -eps (paper eq. 3-4).

    Timesteps (``self.timesteps``) are ``round(linspace(t_start, 0, num_inference_steps))`` with
    ``t_start = T - 1`` (pure noise) or ``start_timestep``: the same even spacing as MONAI's
    ``DDIMScheduler.set_timesteps`` (``[999, 888, ..., 0]`` for T = 1000, N = 10). The update is computed
    here from ``scheduler.alphas_cumprod`` for the previous timestep actually in that list, because MONAI
    1.6.1's ``step()`` assumes ``prev_t = t - T // N`` (899 instead of 888); the last update goes to
    ``scheduler.final_alpha_cumprod``. The scheduler is read once, at construction: its ``timesteps``,
    ``steps_offset`` and ``clip_sample`` are ignored (x0 is clamped only when ``clip_x0`` is given).

    Noise comes from a CPU ``torch.Generator`` seeded with ``seed`` at every call, so a call is bitwise
    repeatable on CPU and each batch item gets its own eps.

    Args:
        scheduler: the ``DDIMScheduler`` the network was trained with; ``prediction_type`` must be "epsilon".
        num_inference_steps: DDIM steps N, 1 <= N <= T. Each step is one network forward.
        num_pairs: K, the number of (eps, -eps) pairs averaged; one forward has batch 2 K B.
        target: "residual": the model diffuses r = (x' - x_c) / residual_scale and the output is
            x_c + residual_scale r0; "image": the model diffuses x' itself.
        residual_scale: divides the residual so that r has roughly unit scale (residual target only).
        start_timestep: None starts from pure noise at T - 1; t in [0, T - 1] starts from
            sqrt(ᾱ_t) target(x') + sqrt(1 - ᾱ_t) eps (eq. 1), which keeps more of x'.
        symmetric: False draws 2 K independent noises instead of eps/-eps (the paper's baseline of
            averaging independent samples); the first K noises equal the symmetric run's eps.
        seed: seed of the noise generator.
        return_spread: also return the per-pixel std over the 2 K members (|a - b| / 2 for K = 1),
            in image units: an uncertainty map.
        clip_x0: clamp the predicted x0 of the diffused variable (r for the residual target) to
            ``(low, high)`` at every step; None never clamps.
        condition_fn: computes x_c from x' when ``__call__`` gets no ``condition`` (e.g. a BSN inferer).
        pad_multiple: reflect-pad the spatial sizes up to a multiple of this, then crop the result: a U-Net
            with L levels needs multiples of 2 ** (L - 1). The padded border's noise is the reflection of
            the inner noise, which touches at most ``pad_multiple - 1`` pixels per axis.
        progress: show a tqdm bar over the DDIM steps (on stderr).
        callback: called after every step with ``{"step", "num_inference_steps", "timestep", "sample",
            "pred_original_sample"}``; the tensors are the whole member batch of the diffused variable.

    Raises:
        ValueError: for an invalid argument; the message names it and the valid range.

    Example (``DiffusionModelUNet`` needs ``einops``)::

        import torch
        from monai.networks.nets import DiffusionModelUNet
        from monai.networks.schedulers import DDIMScheduler
        from diffdenoise.inferers.srds import SRDSInferer

        net = DiffusionModelUNet(spatial_dims=2, in_channels=2, out_channels=1, channels=(8, 8, 8),
                                 attention_levels=(False, False, False), num_res_blocks=1, norm_num_groups=8)
        inferer = SRDSInferer(DDIMScheduler(), num_inference_steps=10, seed=0)
        noisy, x_c = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
        denoised = inferer(noisy, net.eval(), condition=x_c)  # (1, 1, 32, 32)
    """

    def __init__(
        self,
        scheduler: DDIMScheduler,
        num_inference_steps: int = 20,
        num_pairs: int = 1,
        target: str = "residual",
        residual_scale: float = 1.0,
        start_timestep: int | None = None,
        symmetric: bool = True,
        seed: int = 0,
        return_spread: bool = False,
        clip_x0: Sequence[float] | None = None,
        condition_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pad_multiple: int = 1,
        progress: bool = False,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        num_train = int(scheduler.num_train_timesteps)
        if str(scheduler.prediction_type) != DDPMPredictionType.EPSILON:
            raise ValueError(
                f"scheduler.prediction_type is {str(scheduler.prediction_type)!r}, but SRDSInferer needs a network "
                f"that predicts the noise. Build the scheduler with prediction_type='{DDPMPredictionType.EPSILON}'."
            )
        valid_targets = [t.value for t in SRDSTarget]
        if target not in valid_targets:
            raise ValueError(f"target={target!r} is not supported. Set `target` to one of {valid_targets}.")
        if not 1 <= num_inference_steps <= num_train:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is outside [1, {num_train}] (the scheduler's "
                f"num_train_timesteps). Set `num_inference_steps` in that range, e.g. 20."
            )
        if num_pairs < 1:
            raise ValueError(f"num_pairs={num_pairs} must be >= 1 (each pair is one eps and one -eps sample).")
        if not residual_scale > 0:
            raise ValueError(f"residual_scale={residual_scale} must be > 0. Set `residual_scale` to e.g. 1.0.")
        if start_timestep is not None and not 0 <= start_timestep <= num_train - 1:
            raise ValueError(
                f"start_timestep={start_timestep} is outside [0, {num_train - 1}]. Set `start_timestep` in that "
                f"range, or to None to start from pure noise."
            )
        if clip_x0 is not None and (len(clip_x0) != 2 or not clip_x0[0] < clip_x0[1]):
            raise ValueError(f"clip_x0={clip_x0} must be (low, high) with low < high, or None to never clamp.")
        if isinstance(pad_multiple, bool) or not isinstance(pad_multiple, int) or pad_multiple < 1:
            raise ValueError(f"pad_multiple={pad_multiple!r} must be an integer >= 1, e.g. 4 for a 3-level U-Net.")
        if condition_fn is not None and not callable(condition_fn):
            raise ValueError(f"condition_fn must be callable or None, got {type(condition_fn).__name__}.")

        t_start = num_train - 1 if start_timestep is None else int(start_timestep)
        if num_inference_steps > t_start + 1:
            warnings.warn(
                f"num_inference_steps={num_inference_steps} > start_timestep + 1 = {t_start + 1}: only "
                f"{t_start + 1} distinct timesteps exist, so {t_start + 1} steps are run. Lower "
                f"`num_inference_steps` or raise `start_timestep`.",
                stacklevel=2,
            )
        # unique_consecutive: repeated timesteps would be exact no-op updates that still cost a forward.
        self.timesteps = torch.unique_consecutive(
            torch.linspace(t_start, 0, min(num_inference_steps, t_start + 1), dtype=torch.float64).round().long()
        )
        alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        self._alpha_bars = [float(alphas_cumprod[t]) for t in self.timesteps]
        self._alpha_bar_final = float(torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64))

        self.num_inference_steps = len(self.timesteps)
        self.num_pairs = int(num_pairs)
        self.target = SRDSTarget(target)
        self.residual_scale = float(residual_scale)
        self.start_timestep = start_timestep
        self.symmetric = bool(symmetric)
        self.seed = int(seed)
        self.return_spread = bool(return_spread)
        self.clip_x0 = None if clip_x0 is None else (float(clip_x0[0]), float(clip_x0[1]))
        self.condition_fn = condition_fn
        self.pad_multiple = pad_multiple
        self.progress = bool(progress)
        self.callback = callback

    def __call__(
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        condition: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run SRDS: 2 K members (eps_1..eps_K, -eps_1..-eps_K) as one batch per DDIM step, then average.

        Args:
            inputs: noisy image x', shape (B, C, H, W[, D]), any device.
            network: eps predictor called as ``network(cat([x_t, condition], 1), *args, timesteps=t, **kwargs)``,
                e.g. MONAI's ``DiffusionModelUNet`` with ``in_channels = 2 C``.
            condition: x_c, same shape as ``inputs``; None computes it with ``condition_fn(inputs)``.
            args, kwargs: passed on to ``network`` (e.g. ``context``).

        Returns:
            The SRDS mean (B, C, H, W[, D]) with the type and device of ``inputs``; with ``return_spread``,
            ``(mean, spread)`` where spread is the per-pixel std over the 2 K members (>= 0).

        Raises:
            ValueError: ``condition`` is None and no ``condition_fn`` was given, or shapes differ.
        """
        x = _plain(inputs)
        if condition is None:
            if self.condition_fn is None:
                raise ValueError(
                    "No condition given: pass `condition=x_c` to the call, or build SRDSInferer with "
                    "`condition_fn` (e.g. the BSN inferer) to compute x_c from the inputs."
                )
            with torch.no_grad():
                condition = self.condition_fn(inputs)
        cond = _plain(condition).to(x.device)
        _check_shapes(x, condition=cond)
        members_n = 2 * self.num_pairs

        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        eps = torch.randn((self.num_pairs, *x.shape), generator=generator, dtype=torch.float32)
        other = -eps if self.symmetric else torch.randn(eps.shape, generator=generator, dtype=torch.float32)
        noise = torch.cat([eps, other]).to(device=x.device, dtype=x.dtype).flatten(0, 1)

        repeats = (members_n,) + (1,) * (x.ndim - 1)
        diffused = self._reverse_diffusion(x.repeat(repeats), network, cond.repeat(repeats), noise, *args, **kwargs)
        diffused = diffused.reshape(members_n, *x.shape)
        # Average before mapping to image units: x_c + s r is affine, and huge +/- members would lose float bits.
        mean = convert_to_dst_type(self._to_image(diffused.mean(dim=0), cond), inputs)[0]
        if not self.return_spread:
            return mean
        scale = self.residual_scale if self.target is SRDSTarget.RESIDUAL else 1.0
        spread = scale * diffused.std(dim=0, correction=0)
        return mean, convert_to_dst_type(spread, inputs)[0]

    def sample(
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        condition: torch.Tensor,
        noise: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """One deterministic DDIM trajectory per batch item from the given initial noise (eq. 3).

        The same loop as ``__call__`` without the pairing, public as the single-sample baseline for tests and
        benchmarks.

        Args:
            inputs: noisy image x', (B, C, H, W[, D]); used only when ``start_timestep`` is set
                (and for the residual's x_c offset through ``condition``).
            network: eps predictor, see ``__call__``.
            condition: x_c, same shape as ``inputs``.
            noise: the initial eps, same shape as ``inputs``.
            args, kwargs: passed on to ``network``.

        Returns:
            x̂^eps in image units (x_c + residual_scale r0 for the residual target), type of ``inputs``.

        Raises:
            ValueError: if ``condition`` or ``noise`` does not have the shape of ``inputs``.
        """
        x, cond = _plain(inputs), _plain(condition).to(inputs.device)
        _check_shapes(x, condition=cond, noise=noise)
        diffused = self._reverse_diffusion(x, network, cond, noise, *args, **kwargs)
        return convert_to_dst_type(self._to_image(diffused, cond), inputs)[0]

    def _to_image(self, diffused: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return to_image(diffused, cond, self.target, self.residual_scale)

    def _reverse_diffusion(
        self, x: torch.Tensor, network: Callable[..., torch.Tensor], cond: torch.Tensor, noise: torch.Tensor,
        *args: Any, **kwargs: Any,
    ) -> torch.Tensor:
        """The DDIM loop on plain tensors of equal shape, padded to ``pad_multiple``; returns x_0 of the diffused
        variable at the input's size."""
        noise = _plain(noise).to(device=x.device, dtype=x.dtype)
        sizes = x.shape[2:]
        pads = [p for size in reversed(sizes) for p in (0, (-size) % self.pad_multiple)]
        if any(pads):
            x, cond, noise = (F.pad(t, pads, mode="reflect") for t in (x, cond, noise))
        x_t = self._ddim_loop(x, network, cond, noise, *args, **kwargs)
        return x_t[(..., *(slice(0, size) for size in sizes))]

    def _ddim_loop(
        self, x: torch.Tensor, network: Callable[..., torch.Tensor], cond: torch.Tensor, noise: torch.Tensor,
        *args: Any, **kwargs: Any,
    ) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from the start state to x_0, one network forward per timestep."""
        with torch.no_grad():
            if self.start_timestep is None:
                x_t = noise
            else:
                diffused = to_diffused(x, cond, self.target, self.residual_scale)
                alpha_bar = self._alpha_bars[0]
                x_t = alpha_bar**0.5 * diffused + (1.0 - alpha_bar) ** 0.5 * noise
            alpha_bars_prev = [*self._alpha_bars[1:], self._alpha_bar_final]
            steps = zip(self.timesteps.tolist(), self._alpha_bars, alpha_bars_prev)
            bar = tqdm(steps, total=self.num_inference_steps, desc="SRDS", disable=not self.progress)
            for i, (t, alpha_bar, alpha_bar_prev) in enumerate(bar):
                t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
                eps_hat = network(torch.cat([x_t, cond], dim=1), *args, timesteps=t_batch, **kwargs)
                x_t, x0_hat = _ddim_update(x_t, eps_hat, alpha_bar, alpha_bar_prev, self.clip_x0)
                if self.callback is not None:
                    self.callback(
                        {
                            "step": i,
                            "num_inference_steps": self.num_inference_steps,
                            "timestep": t,
                            "sample": x_t,
                            "pred_original_sample": x0_hat,
                        }
                    )
        return x_t
