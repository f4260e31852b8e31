"""Training inferer of the learned blind-spot prior: the network's mean and variance, stacked for the loss."""

from __future__ import annotations

from typing import Any, Callable

import torch
from monai.inferers import Inferer

__all__ = ["PriorInferer"]


class PriorInferer(Inferer):
    """cat([mu, v], dim=1) of a ``BlindSpotNet`` with ``prior_variance=True``: (B, 2C, H, W), what
    ``PriorLikelihoodLoss`` scores (a trainer hands its loss one prediction tensor)."""

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        """``network(inputs, variance=True)``, i.e. ``torch.cat(network.prior(inputs), dim=1)``; called through
        ``forward`` so that a ``DistributedDataParallel`` wrapper (multi_gpu_train.yaml) syncs the gradients."""
        return network(inputs, *args, variance=True, **kwargs)
