"""Stage 2 training batches: the conditional diffusion model learns eps from the noisy slices and x_c.

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
