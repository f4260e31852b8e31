"""Stage-1 inferer: the BSN estimate x_c, with AP-BSN's asymmetric PD and random-replacing refinement.

Paper: Lee et al., "AP-BSN" (CVPR 2022), Sec. 3.3 (asymmetric PD: train with stride 5, test with 2)
and Sec. 3.4 (R3, random-replacing refinement: re-inject a fraction p = 0.16 of noisy pixels into the
first estimate, denoise again without PD, average T passes). The blind square hides the pixel's own
neighbourhood, so x0 = BSN(noisy) loses fine detail; refinement gives it back from the noisy input.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from monai.inferers import Inferer

__all__ = ["BlindSpotInferer"]


class BlindSpotInferer(Inferer):
    """x_c = BSN(noisy), optionally with test-time PD stride and random-replacement refinement (AP-BSN R3).

    Args:
        pd_stride: stride for the first pass; None uses the network's training stride.
        refine_passes: number T of refinement passes; 0 returns the first pass unchanged.
        refine_prob: fraction p of pixels of x0 replaced by noisy pixels in each pass, in (0, 1).
        refine_pd_stride: stride for the refinement passes (AP-BSN: 1, i.e. no PD).
        seed: seeds the replacement masks; the same seed gives bitwise the same output.

    Raises:
        ValueError: an argument out of range, with the knob to change in the message.

    Example::

        import torch
        from diffdenoise.inferers import BlindSpotInferer
        from diffdenoise.networks import BlindSpotNet

        net = BlindSpotNet(features=48, num_blocks=5, pd_stride=5).eval()   # trained with PD5
        inferer = BlindSpotInferer(pd_stride=2, refine_passes=8, refine_prob=0.16, seed=0)
        noisy = torch.rand(4, 1, 256, 256)
        x_c = inferer(noisy, net)                                          # (4, 1, 256, 256)
    """

    def __init__(
        self,
        pd_stride: int | None = None,
        refine_passes: int = 0,
        refine_prob: float = 0.16,
        refine_pd_stride: int = 1,
        seed: int = 0,
    ):
        super().__init__()
        if pd_stride is not None and (isinstance(pd_stride, bool) or not isinstance(pd_stride, int) or pd_stride < 1):
            raise ValueError(
                f"pd_stride must be None (the network's training stride) or an integer >= 1, got {pd_stride!r}. "
                "Set `pd_stride` to e.g. 2 for a network trained with stride 5 (AP-BSN)."
            )
        if isinstance(refine_passes, bool) or not isinstance(refine_passes, int) or refine_passes < 0:
            raise ValueError(
                f"refine_passes must be an integer >= 0, got {refine_passes!r}. "
                "Set `refine_passes` to 0 to switch refinement off, or e.g. 8 (AP-BSN)."
            )
        if not 0.0 < refine_prob < 1.0:
            raise ValueError(
                f"refine_prob must lie in (0, 1), got {refine_prob!r}. Set `refine_prob` to e.g. 0.16 (AP-BSN)."
            )
        if isinstance(refine_pd_stride, bool) or not isinstance(refine_pd_stride, int) or refine_pd_stride < 1:
            raise ValueError(
                f"refine_pd_stride must be an integer >= 1, got {refine_pd_stride!r}. "
                "Set `refine_pd_stride` to 1 (AP-BSN refines without PD)."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}. Set `seed` to e.g. @seed in the bundle.")
        self.pd_stride = pd_stride
        self.refine_passes = refine_passes
        self.refine_prob = refine_prob
        self.refine_pd_stride = refine_pd_stride
        self.seed = seed

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Denoise ``inputs`` of shape (B, C, H, W) with ``network(x, pd_stride=...)``; same shape out.

        Gradients are off unless ``network.training`` is set; extra ``args``/``kwargs`` go to ``network``.
        Refinement mixes input and output pixels, so it needs as many output channels as input channels.
        """
        training = bool(getattr(network, "training", False))
        with torch.set_grad_enabled(training and torch.is_grad_enabled()):
            x0 = network(inputs, *args, pd_stride=self.pd_stride, **kwargs)
            if self.refine_passes == 0:
                return x0
            # A fresh generator per call: the same inputs and seed give bitwise the same masks.
            generator = torch.Generator(device=inputs.device).manual_seed(self.seed)
            b, _, h, w = inputs.shape
            total = torch.zeros_like(x0)
            for _ in range(self.refine_passes):
                # One mask per pixel, shared by its channels.
                keep_noisy = torch.rand((b, 1, h, w), generator=generator, device=inputs.device) < self.refine_prob
                mixed = torch.where(keep_noisy, inputs, x0)
                total = total + network(mixed, *args, pd_stride=self.refine_pd_stride, **kwargs)
            return total / self.refine_passes
