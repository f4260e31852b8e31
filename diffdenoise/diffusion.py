"""Stage 2 training batches: the paper's conditional diffusion (eps from the noisy slices and x_c) and the
leak-free recorrupted form (``RecorruptedDiffusionBatch``, issue 16).

MONAI's ``DiffusionPrepareBatch`` draws eps and t and lets ``DiffusionInferer`` noise the ``image`` key;
this subclass first replaces ``image`` by the diffused variable (the residual r = (x' - x_c) / s of paper
Sec. 3.2, or x' itself, exactly as ``SRDSInferer`` maps it back) and asks the inferer to concatenate x_c
as a channel. The loss on the predicted eps (L1, eq. 2) is the trainer's ``loss_function``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from monai.engines.utils import DiffusionPrepareBatch

from diffdenoise.inferers.srds import to_diffused
from diffdenoise.recorruption import band_timesteps, schedule_rho


class ConditionalDiffusionBatch(DiffusionPrepareBatch):
    """(diffused variable, eps target, kwargs with t, eps, x_c and ``mode="concat"``) for a trainer or evaluator.

    Args:
        num_train_timesteps: T of the noise schedule; t is drawn uniformly from [0, T).
        condition_name: batch key of x_c (the stage-1 output, ``bsn``).
        target: ``"residual"`` or ``"image"``, as in ``SRDSInferer``.
        residual_scale: s in r = (x' - x_c) / s, chosen so r has about unit std.
    """

    def __init__(self, num_train_timesteps: int, condition_name: str = "bsn", target: str = "residual",
                 residual_scale: float = 1.0):
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        self.target = target
        self.residual_scale = float(residual_scale)

    def __call__(self, batchdata: Mapping[str, torch.Tensor], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any):
        condition = batchdata[self.condition_name]
        diffused = to_diffused(batchdata["image"], condition, self.target, self.residual_scale)
        images, target, args, infer_kwargs = super().__call__(
            {**batchdata, "image": diffused}, device, non_blocking, **kwargs)
        return images, target, args, {**infer_kwargs, "mode": "concat"}


class RecorruptedDiffusionBatch:
    """Stage 2 of the leak-free path: (z, weighted target y~, (), kwargs) for ``RecorruptedX0Inferer``.

    Per item: a timestep t drawn uniformly from those whose rho = s_t lies in ``band`` (in units of the noise
    std, ``diffdenoise.recorruption``), one split (z, y~) of the noisy slice at that rho, and the condition
    c = ``condition_fn(z)``, a function of the network input only (never of y: see
    ``diffdenoise.inferers.tweedie``). The loss w_t ||h(z) - y~||^2 is a plain MSE on both sides scaled by
    sqrt(w_t) / sigma_ref (``loss_scale``), with w_t = 1 (``"r2r"``) or the ambient-diffusion weight
    (s_t^2 / (sigma^2 + s_t^2))^2 = (rho^2 / (1 + rho^2))^2 (``"ambient"``). Draws use torch's global RNG,
    which the resume checkpoints keep.

    Args:
        recorruption: the noise model's split (``diffdenoise.recorruption.make_recorruption``).
        scheduler: the noise schedule (its ``alphas_cumprod`` map t to rho).
        band: (low, high) rho of the timesteps trained on, e.g. (0.25, 1.5).
        weighting: ``"r2r"`` or ``"ambient"``.
        condition_fn: c = condition_fn(z), e.g. the stage-1 BSN; None trains an unconditioned network.
    """

    WEIGHTINGS = ("r2r", "ambient")

    def __init__(self, recorruption, scheduler, band=(0.25, 1.5), weighting: str = "r2r", condition_fn=None):
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"recorruption_weighting {weighting!r} is not one of {', '.join(self.WEIGHTINGS)}")
        self.recorruption = recorruption
        self.timesteps = band_timesteps(scheduler.alphas_cumprod, band)
        self.rho_of_timestep = schedule_rho(scheduler.alphas_cumprod)
        self.weighting = weighting
        self.condition_fn = condition_fn

    def __call__(self, batchdata: Mapping[str, torch.Tensor], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any):
        y = batchdata["image"]
        y = (y.as_tensor() if hasattr(y, "as_tensor") else y).to(device=device, non_blocking=non_blocking)
        timesteps = self.timesteps[torch.randint(len(self.timesteps), (len(y),))].to(y.device)
        rho = self.rho_of_timestep[timesteps.cpu()].to(y.device)
        z, target = self.recorruption.split(y, self.recorruption.draw(y), rho)
        condition = None
        if self.condition_fn is not None:
            with torch.no_grad():
                condition = self.condition_fn(z)
        weight = torch.ones_like(rho) if self.weighting == "r2r" else (rho**2 / (1 + rho**2)) ** 2
        loss_scale = (weight.sqrt() / self.recorruption.sigma_ref).to(y.dtype)
        target = target * loss_scale.reshape(-1, *[1] * (y.ndim - 1))
        return z, target, (), {"timesteps": timesteps, "rho": rho, "condition": condition, "loss_scale": loss_scale}
